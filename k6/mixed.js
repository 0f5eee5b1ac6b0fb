// Everything at once on the same users: charges, uses, payments, refunds, cancellations
// and reads, each its own
// scenario and executor, all on random users 1..USERS so a charge, a use and a payment
// of one user keep meeting (the original's "wrong lock key" lesson: the lock names the
// user, so they must serialise, and nothing may be lost).
//
// At TIME_SCALE=1 and MAX_VUS=100 (VU counts and rates scale with MAX_VUS / 100):
//   charges   ramping-vus            20 s -> 25 VUs, 80 s at 25, 20 s -> 0; charge 1000..10000, sleep 0.5 s
//   uses      constant-vus           25 VUs for 120 s; use 1000..15000, sleep 0.5 s
//   payments  ramping-arrival-rate   2/s -> 20 payments/s (20 s), 80 s at 20/s, 20 s -> 0; up to 25 VUs;
//                                    order of 100..5000, pay, then repeat the key once (must replay)
//   reads     constant-arrival-rate  50/s for 120 s, up to 25 VUs; GET balance + GET history?limit=20
//   refunds   constant-arrival-rate  4/s for 120 s, up to 15 VUs; charge the order's amount, order of
//                                    1000..5000, pay, refund a fifth (and its key again: replay), two
//                                    more fifths at once (two keys), the rest (no amount: REFUNDED),
//                                    then 1 more (422 REFUND_EXCEEDS_PAYMENT, and again: replay);
//                                    the payment, its refunds and the order read back
//   cancels   constant-arrival-rate  4/s for 120 s, up to 15 VUs; an order, then one of: cancel
//                                    (twice: the same 200) and pay it (409 ORDER_CANCELLED, and the
//                                    key again: replay); pay and cancel at once (one wins); pay, then
//                                    cancel (409 ORDER_ALREADY_PAID); the order read back
//
// 422 INSUFFICIENT_BALANCE on a use or a payment is an expected business answer, not an
// error (balances drift down: uses and payments outweigh charges); so are the refusals a
// refund or a cancellation is built to meet (REFUND_EXCEEDS_PAYMENT, ORDER_CANCELLED,
// ORDER_ALREADY_PAID; the requests that may meet them expect 409 too). Everything else
// that is not the operation's success (5xx, 409 from a key collision, another 4xx, a
// wrong body) is an error. Thresholds: no failed request, no error, all checks, and the
// original's p95 < 150 ms / p99 < 300 ms (NO_LATENCY_THRESHOLDS=1 drops them).
// Teardown checks each user's balance against its newest ledger entries (LEDGER_CHECK=0
// skips it: set it when other load runs against the service at the same time).
//
//   k6 run k6/mixed.js
//   TIME_SCALE=0.1 MAX_VUS=20 k6 run k6/mixed.js
import { check, sleep } from 'k6';
import http from 'k6/http';
import { Counter, Rate } from 'k6/metrics';
import {
  USERS, cancel, cancelRequest, charge, createOrder, envNumber, get, isInt, json, latencyThresholds,
  ledgerStory, maxVus, newKey, pay, paymentRequest, problemCode, randomInt, randomUser, refund,
  refundRequest, replayed, requireService, reportServer, scaleCount, scaledDuration, scaleStages, scrapeServer,
  serverThresholds, use,
} from './lib.js';

const PEAK = maxVus(100);
const SLEEP_S = envNumber('SLEEP', 0.5);
const LEDGER_CHECK = (__ENV.LEDGER_CHECK || '1') !== '0';
const n = (x) => scaleCount(x, 100, PEAK);

// A use or a payment refused for want of money is a normal answer.
http.setResponseCallback(http.expectedStatuses(200, 201, 422));

const errors = new Rate('errors');
const usesRefused = new Counter('uses_refused_insufficient_balance');
const paymentsRefused = new Counter('payments_refused_insufficient_balance');
const paymentsCompleted = new Counter('payments_completed');
const duplicatesPrevented = new Counter('duplicate_payments_prevented');
const refundsApplied = new Counter('refunds_applied');
const refundsRefused = new Counter('refunds_refused_exceeds_payment');
const refundReplays = new Counter('refund_replays');
const paymentsRefunded = new Counter('payments_refunded_in_full');
const refundsSkipped = new Counter('refund_iterations_skipped_insufficient_balance');
const cancelsApplied = new Counter('cancels_applied');
const cancelsRefusedPaid = new Counter('cancels_refused_order_already_paid');
const paymentsRefusedCancelled = new Counter('payments_refused_order_cancelled');
const racesWonByPayment = new Counter('cancel_races_won_by_payment');
const racesWonByCancel = new Counter('cancel_races_won_by_cancel');

// The requests built to meet a 409 (a cancellation, a payment of an order that may be
// cancelled): 409 is no failed request there; the checks say which 409 is right.
const may409 = http.expectedStatuses(200, 409, 422);

export const options = {
  scenarios: {
    charges: {
      executor: 'ramping-vus',
      exec: 'charges',
      startVUs: 0,
      stages: scaleStages([[20, 25], [80, 25], [20, 0]], 100, PEAK),
      gracefulRampDown: '10s',
    },
    uses: {
      executor: 'constant-vus',
      exec: 'uses',
      vus: n(25),
      duration: scaledDuration(120),
      gracefulStop: '10s',
    },
    payments: {
      executor: 'ramping-arrival-rate',
      exec: 'payments',
      startRate: n(2),
      timeUnit: '1s',
      preAllocatedVUs: n(10),
      maxVUs: n(25),
      stages: scaleStages([[20, 20], [80, 20], [20, 0]], 100, PEAK),
      gracefulStop: '10s',
    },
    reads: {
      executor: 'constant-arrival-rate',
      exec: 'reads',
      rate: n(50),
      timeUnit: '1s',
      duration: scaledDuration(120),
      preAllocatedVUs: n(10),
      maxVUs: n(25),
      gracefulStop: '10s',
    },
    refunds: {
      executor: 'constant-arrival-rate',
      exec: 'refunds',
      rate: n(4),
      timeUnit: '1s',
      duration: scaledDuration(120),
      preAllocatedVUs: n(5),
      maxVUs: n(15),
      gracefulStop: '10s',
    },
    cancels: {
      executor: 'constant-arrival-rate',
      exec: 'cancels',
      rate: n(4),
      timeUnit: '1s',
      duration: scaledDuration(120),
      preAllocatedVUs: n(5),
      maxVUs: n(15),
      gracefulStop: '10s',
    },
  },
  thresholds: Object.assign(
    {
      errors: ['rate==0'],
      http_req_failed: ['rate==0'],
      checks: ['rate==1.0'],
    },
    latencyThresholds('http_req_duration', { p95: 150, p99: 300 }),
    {
      'http_req_duration{scenario:charges}': [],
      'http_req_duration{scenario:uses}': [],
      'http_req_duration{scenario:payments}': [],
      'http_req_duration{scenario:reads}': [],
      'http_req_duration{scenario:refunds}': [],
      'http_req_duration{scenario:cancels}': [],
      'errors{scenario:charges}': [],
      'errors{scenario:uses}': [],
      'errors{scenario:payments}': [],
      'errors{scenario:reads}': [],
      'errors{scenario:refunds}': [],
      'errors{scenario:cancels}': [],
    },
    serverThresholds(),
  ),
  summaryTrendStats: ['avg', 'min', 'med', 'p(90)', 'p(95)', 'p(99)', 'max'],
};

export function setup() {
  requireService();
  return { server: scrapeServer() };
}

function pause() {
  if (SLEEP_S > 0) sleep(SLEEP_S);
}

export function charges() {
  const userId = randomUser();
  const amount = randomInt(1, 10) * 1000;
  const res = charge(userId, amount, newKey());
  const b = json(res);
  errors.add(!check(res, {
    'charge: 200 with the new balance': (r) =>
      r.status === 200 && !replayed(r) && b !== null && isInt(b.balance) && b.chargedAmount === amount && b.userId === userId,
  }));
  pause();
}

export function uses() {
  const userId = randomUser();
  const amount = randomInt(1, 15) * 1000;
  const res = use(userId, amount, newKey());
  const b = json(res);
  const refused = res.status === 422 && problemCode(res) === 'INSUFFICIENT_BALANCE';
  if (refused) usesRefused.add(1);
  errors.add(!check(res, {
    'use: 200 with a balance >= 0, or 422 INSUFFICIENT_BALANCE': (r) =>
      refused ||
      (r.status === 200 && !replayed(r) && b !== null && isInt(b.balance) && b.balance >= 0 && b.usedAmount === amount && b.userId === userId),
  }));
  pause();
}

export function payments() {
  const userId = randomUser();
  const amount = randomInt(1, 50) * 100;
  const o = createOrder(userId, amount);
  const ob = json(o);
  const orderOk = check(o, {
    'order: 201 PENDING': (r) => r.status === 201 && ob !== null && isInt(ob.orderId) && ob.status === 'PENDING' && ob.amount === amount,
  });
  if (!orderOk) {
    errors.add(true);
    return;
  }
  const key = newKey();
  const first = pay(ob.orderId, userId, key);
  const fb = json(first);
  const refused = first.status === 422 && problemCode(first) === 'INSUFFICIENT_BALANCE';
  const paid = first.status === 200 && !replayed(first) && fb !== null && fb.status === 'COMPLETED' &&
    fb.orderId === ob.orderId && fb.amount === amount && isInt(fb.balance) && fb.balance >= 0;
  if (paid) paymentsCompleted.add(1);
  if (refused) paymentsRefused.add(1);
  // The same key again (a double click): the same status and a byte-identical body,
  // marked as a replay, for a success and for a refusal alike.
  const again = pay(ob.orderId, userId, key);
  const sameAnswer = again.status === first.status && replayed(again) && again.body === first.body;
  if (paid && sameAnswer) duplicatesPrevented.add(1);
  errors.add(!check(first, {
    'payment: 200 COMPLETED, or 422 INSUFFICIENT_BALANCE': () => paid || refused,
    'payment: the repeated key replays the first answer': () => sameAnswer,
  }));
}

// A payment of this iteration's own (so its refunds are deterministic), refunded in steps.
export function refunds() {
  const userId = randomUser();
  const amount = randomInt(10, 50) * 100;
  // Money for the payment first, so the refunds run even when uses have drained the user.
  const c = charge(userId, amount, newKey(), { scenario_step: 'refund charge' });
  const o = createOrder(userId, amount);
  const ob = json(o);
  if (!check(null, {
    'refund setup: charge 200, order 201 PENDING': () => c.status === 200 && o.status === 201 && ob !== null && isInt(ob.orderId),
  })) {
    errors.add(true);
    return;
  }
  const p = pay(ob.orderId, userId, newKey());
  const pb = json(p);
  if (p.status === 422 && problemCode(p) === 'INSUFFICIENT_BALANCE') {
    refundsSkipped.add(1); // concurrent uses took the charge: a normal answer, nothing to refund
    return;
  }
  if (!check(p, { 'refund setup: payment 200 COMPLETED': (r) => r.status === 200 && pb !== null && isInt(pb.paymentId) && pb.status === 'COMPLETED' })) {
    errors.add(true);
    return;
  }
  const pid = pb.paymentId;
  const fifth = Math.floor(amount / 5);
  const good = (r, b, amt, total, status) => r.status === 200 && b !== null && b.paymentId === pid && b.userId === userId &&
    b.orderId === ob.orderId && b.amount === amt && b.refundedTotal === total && b.paymentStatus === status && isInt(b.balance) && isInt(b.refundId);

  const k1 = newKey();
  const r1 = refund(pid, fifth, k1, 'size');
  const b1 = json(r1);
  // The same key with another reason: the reason is not part of the fingerprint, so the first answer comes back.
  const r1again = refund(pid, fifth, k1, 'another reason');
  // Two refunds of one payment at once, two keys: both fit, so both apply, one after the other.
  const pair = http.batch([refundRequest(pid, fifth, newKey()), refundRequest(pid, fifth, newKey())]);
  const totals = pair.map((r) => (json(r) || {}).refundedTotal).sort((a, b) => a - b);
  const rest = refund(pid, undefined, newKey());
  const rb = json(rest);
  const k3 = newKey();
  const over = refund(pid, 1, k3);
  const overAgain = refund(pid, 1, k3);
  const gp = get(`/api/payments/${pid}`, 'payment');
  const gpb = json(gp);
  const gl = get(`/api/payments/${pid}/refunds`, 'refunds');
  const glb = json(gl);
  const go = get(`/api/orders/${ob.orderId}`, 'order');
  const gob = json(go);
  const refundedOk = gp.status === 200 && gpb !== null && gpb.status === 'REFUNDED' && gpb.refundedTotal === amount;
  const ok = check(null, {
    'refund: a part, 200 PARTIALLY_REFUNDED': () => !replayed(r1) && good(r1, b1, fifth, fifth, 'PARTIALLY_REFUNDED') && b1.reason === 'size',
    'refund: its key again replays the first answer byte for byte': () => r1again.status === 200 && replayed(r1again) && r1again.body === r1.body,
    'refund: two at once both apply, totals 3/5 and 2/5 of the payment': () =>
      pair.every((r) => r.status === 200 && !replayed(r) && (json(r) || {}).amount === fifth) &&
      totals[0] === 2 * fifth && totals[1] === 3 * fifth,
    'refund: the rest (no amount), 200 REFUNDED': () => !replayed(rest) && good(rest, rb, amount - 3 * fifth, amount, 'REFUNDED'),
    'refund: nothing left, 422 REFUND_EXCEEDS_PAYMENT, replayed': () =>
      over.status === 422 && problemCode(over) === 'REFUND_EXCEEDS_PAYMENT' && !replayed(over) &&
      overAgain.status === 422 && replayed(overAgain) && overAgain.body === over.body,
    'refund: GET payment REFUNDED with refundedTotal = amount, 4 refunds oldest first, order REFUNDED': () =>
      refundedOk && gl.status === 200 && glb !== null && Array.isArray(glb.items) && glb.items.length === 4 &&
      glb.items.every((it, i) => it.paymentId === pid && (i === 0 || it.refundId > glb.items[i - 1].refundId)) &&
      glb.items.reduce((s, it) => s + it.amount, 0) === amount && go.status === 200 && gob !== null && gob.status === 'REFUNDED',
  });
  errors.add(!ok);
  refundsApplied.add([r1, pair[0], pair[1], rest].filter((r) => r.status === 200 && !replayed(r)).length);
  if (over.status === 422) refundsRefused.add(1);
  refundReplays.add([r1again, overAgain].filter((r) => replayed(r)).length);
  if (refundedOk) paymentsRefunded.add(1);
}

export function cancels() {
  const userId = randomUser();
  const amount = randomInt(1, 50) * 100;
  const o = createOrder(userId, amount);
  const ob = json(o);
  if (!check(o, { 'cancel setup: order 201 PENDING': (r) => r.status === 201 && ob !== null && isInt(ob.orderId) })) {
    errors.add(true);
    return;
  }
  const orderId = ob.orderId;
  const cancelled = (r) => r.status === 200 && (json(r) || {}).status === 'CANCELLED' && (json(r) || {}).orderId === orderId;
  const is = (r, status, code) => r.status === status && problemCode(r) === code;
  const orderNow = () => (json(get(`/api/orders/${orderId}`, 'order')) || {}).status;
  const kind = Math.random();
  let ok;
  if (kind < 0.4) {
    // Cancel it (twice: the same 200), then pay it: 409 ORDER_CANCELLED, stored and replayed.
    const c1 = cancel(orderId, undefined, may409);
    const c2 = cancel(orderId, undefined, may409);
    const key = newKey();
    const p1 = pay(orderId, userId, key, undefined, may409);
    const p2 = pay(orderId, userId, key, undefined, may409);
    if (cancelled(c1)) cancelsApplied.add(1);
    if (is(p1, 409, 'ORDER_CANCELLED')) paymentsRefusedCancelled.add(1);
    ok = check(null, {
      'cancel: 200 CANCELLED, and again the same 200': () => cancelled(c1) && cancelled(c2),
      'cancel: paying it is 409 ORDER_CANCELLED, and the key again replays it': () =>
        is(p1, 409, 'ORDER_CANCELLED') && !replayed(p1) && p2.status === 409 && replayed(p2) && p2.body === p1.body,
      'cancel: the order reads CANCELLED': () => orderNow() === 'CANCELLED',
    });
  } else if (kind < 0.8) {
    // Pay and cancel at once: whichever commits first wins, and the other sees it.
    const [p, c] = http.batch([paymentRequest(orderId, userId, newKey(), undefined, may409), cancelRequest(orderId, undefined, may409)]);
    const payWon = p.status === 200 && (json(p) || {}).status === 'COMPLETED' && is(c, 409, 'ORDER_ALREADY_PAID');
    const cancelWon = cancelled(c) && (is(p, 409, 'ORDER_CANCELLED') || is(p, 422, 'INSUFFICIENT_BALANCE'));
    if (payWon) { racesWonByPayment.add(1); cancelsRefusedPaid.add(1); }
    if (cancelWon) { racesWonByCancel.add(1); cancelsApplied.add(1); }
    const now = orderNow();
    ok = check(null, {
      'cancel race: exactly one of payment and cancellation wins': () => payWon !== cancelWon,
      'cancel race: the order reads as the winner left it': () => (payWon && now === 'PAID') || (cancelWon && now === 'CANCELLED'),
    });
  } else {
    // Pay, then cancel: a paid order cannot be cancelled (409 ORDER_ALREADY_PAID, not stored).
    const p = pay(orderId, userId, newKey(), undefined, may409);
    const c = cancel(orderId, undefined, may409);
    const paid = p.status === 200;
    if (paid && is(c, 409, 'ORDER_ALREADY_PAID')) cancelsRefusedPaid.add(1);
    if (!paid && cancelled(c)) cancelsApplied.add(1);
    ok = check(null, {
      'cancel after paying: 409 ORDER_ALREADY_PAID (or 200 when the payment was refused for want of money)': () =>
        (paid && is(c, 409, 'ORDER_ALREADY_PAID')) || (is(p, 422, 'INSUFFICIENT_BALANCE') && cancelled(c)),
    });
  }
  errors.add(!ok);
}

export function reads() {
  const userId = randomUser();
  const b = get(`/api/users/${userId}/balance`, 'balance');
  const bb = json(b);
  const h = get(`/api/users/${userId}/balance/history?limit=20`, 'history');
  const hb = json(h);
  errors.add(!check(null, {
    'balance: 200 with a balance >= 0': () => b.status === 200 && bb !== null && bb.userId === userId && isInt(bb.balance) && bb.balance >= 0,
    'history: 200, at most 20 entries, newest first': () =>
      h.status === 200 && hb !== null && Array.isArray(hb.items) && hb.items.length <= 20 &&
      hb.items.every((e, i) => i === 0 || e.id < hb.items[i - 1].id) &&
      (hb.next === null || isInt(hb.next)),
  }));
}

export function teardown(data) {
  reportServer(data.server);
  if (!LEDGER_CHECK) return;
  const broken = [];
  let entries = 0;
  for (let u = 1; u <= USERS; u++) {
    const s = ledgerStory(u, 500);
    if (!s.ok) broken.push(s.why);
    else entries += s.entries;
  }
  check(null, { 'every balance agrees with its newest ledger entries': () => broken.length === 0 });
  console.log(`ledger check: ${USERS} users, ${entries} entries read, ${broken.length} broken${broken.length ? `: ${broken.slice(0, 5).join('; ')}` : ''}`);
}
