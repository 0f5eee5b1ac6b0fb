// Contention: every VU charges ONE user, with a fresh key each time and no sleep, so
// every request queues on the same per-user lock (the original's first, accidental,
// load shape). Measures how the lock holds up: no LOCK_TIMEOUT (503), no lost update.
//
//   VUS=32 DURATION=30s HOT_USER=1 k6 run k6/hot-user.js
//
// Correctness: teardown reads the user's ledger entries written during the run and
// checks the balance grew by exactly AMOUNT per CHARGE entry (a lost update would leave
// the balance short of its ledger). The summary shows, side by side, `charges_applied`
// (charges answered 200, client side) and `hot_user_ledger_charges` (CHARGE entries in
// the ledger), which must be equal, and `charged_amount` against
// `hot_user_balance_delta`. With other load on the same user set CHECK_DELTA=0.
import { check } from 'k6';
import http from 'k6/http';
import { Counter, Gauge, Rate } from 'k6/metrics';
import {
  BASE_URL, charge, envDuration, envFlag, envInt, headers, isInt, json, latencyThresholds, newKey,
  problemCode, replayed, requireService, reportServer, scrapeServer, serverThresholds,
} from './lib.js';

const VUS = envInt('VUS', 32, 1);
const DURATION = envDuration('DURATION', '30s');
const HOT_USER = envInt('HOT_USER', 1, 1);
const AMOUNT = envInt('AMOUNT', 10000, 1);
const CHECK_DELTA = (__ENV.CHECK_DELTA || '1') !== '0';

const chargesApplied = new Counter('charges_applied');
const chargedAmount = new Counter('charged_amount');
const lockTimeouts = new Counter('lock_timeouts');
const chargeOk = new Rate('charge_ok');
const balanceDelta = new Gauge('hot_user_balance_delta');
const ledgerCharges = new Gauge('hot_user_ledger_charges');

export const options = {
  scenarios: {
    hot_user: { executor: 'constant-vus', vus: VUS, duration: DURATION, gracefulStop: '15s' },
  },
  thresholds: Object.assign(
    {
      http_req_failed: ['rate==0'],
      checks: ['rate==1.0'],
      charge_ok: ['rate==1.0'],
      lock_timeouts: ['count==0'],
    },
    // Informational by default: contention latency grows with VUS. P95_MS/P99_MS set a bar.
    envFlag('NO_LATENCY_THRESHOLDS') || (!__ENV.P95_MS && !__ENV.P99_MS)
      ? { 'http_req_duration{name:charge}': [] }
      : latencyThresholds('http_req_duration{name:charge}', {}),
    serverThresholds(),
  ),
  summaryTrendStats: ['avg', 'min', 'med', 'p(90)', 'p(95)', 'p(99)', 'max'],
};

function balanceOf(userId) {
  const r = http.get(`${BASE_URL}/api/users/${userId}/balance`, { headers: headers(), tags: { name: 'setup' } });
  const b = json(r);
  if (r.status !== 200 || !b || !isInt(b.balance)) throw new Error(`GET balance of user ${userId}: ${r.status}`);
  return b.balance;
}

function lastLedgerId(userId) {
  const r = http.get(`${BASE_URL}/api/users/${userId}/balance/history?limit=1`, { headers: headers(), tags: { name: 'setup' } });
  const b = json(r);
  if (r.status !== 200 || !b || !Array.isArray(b.items)) throw new Error(`GET history of user ${userId}: ${r.status}`);
  return b.items.length ? b.items[0].id : 0;
}

export function setup() {
  requireService();
  return { server: scrapeServer(), balance: balanceOf(HOT_USER), lastId: lastLedgerId(HOT_USER) };
}

export default function () {
  const res = charge(HOT_USER, AMOUNT, newKey(), { user: 'hot' });
  const body = json(res);
  const ok = check(res, {
    'charge status is 200': (r) => r.status === 200,
    'charge body has a numeric balance': () => body !== null && isInt(body.balance),
    'a fresh key is not a replay': (r) => !replayed(r),
  });
  chargeOk.add(ok);
  if (res.status === 200) {
    chargesApplied.add(1);
    chargedAmount.add(AMOUNT);
  } else if (problemCode(res) === 'LOCK_TIMEOUT') {
    lockTimeouts.add(1);
  }
}

// The balance must have grown by exactly AMOUNT per CHARGE the ledger recorded after
// setup: no lost update, no double application (the ledger pages are read newest first).
export function teardown(data) {
  reportServer(data.server);
  const after = balanceOf(HOT_USER);
  balanceDelta.add(after - data.balance);
  if (!CHECK_DELTA) return;
  let charges = 0;
  let others = 0;
  let before = null;
  for (;;) {
    const q = before === null ? 'limit=500' : `limit=500&before=${before}`;
    const r = http.get(`${BASE_URL}/api/users/${HOT_USER}/balance/history?${q}`, { headers: headers(), tags: { name: 'teardown history' } });
    const b = json(r);
    if (r.status !== 200 || !b || !Array.isArray(b.items)) throw new Error(`GET history: ${r.status}`);
    let done = false;
    for (const e of b.items) {
      if (e.id <= data.lastId) { done = true; break; }
      if (e.type === 'CHARGE' && e.amount === AMOUNT) charges += 1; else others += 1;
    }
    if (done || b.next === null || b.next === undefined) break;
    before = b.next;
  }
  ledgerCharges.add(charges);
  check(null, {
    'hot user: only this run touched the balance (else set CHECK_DELTA=0)': () => others === 0,
    'hot user: balance grew by AMOUNT x the CHARGE entries of the run': () => after - data.balance === charges * AMOUNT,
  });
  console.log(`hot user ${HOT_USER}: balance ${data.balance} -> ${after} (+${after - data.balance}), ${charges} CHARGE entries of ${AMOUNT} in the ledger, ${others} other entries`);
}
