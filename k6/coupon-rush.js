// A flash sale: VUS users (default 1000) rush ONE coupon of STOCK units (default 100) at the
// same instant, first come first served, one unit per user.
//
// setup(): creates the coupon (POST /api/coupons, an admin operation: API_TOKEN is sent when
// set) unless COUPON_ID names one, then warms the users: GET the balance of each of users
// 1..VUS (they must exist: `balance-service seed --users 1000 --balance 100000`), so the
// rush measures issuing, not first reads.
// The rush: VUS VUs, one iteration each (per-vu-iterations: every VU is initialised first and
// all start together), VU n being user USER_OFFSET + n. Each sends
// POST /api/coupons/{id}/issue {"userId","idempotencyKey"} with a key of its own, and on a
// 5xx, a 409 (IDEMPOTENCY_KEY_IN_USE) or a network error sends it again with the SAME key
// (backoff, Retry-After honoured) until it gets 200 or 422, at most MAX_TRIES times.
// teardown(): GET /api/coupons/{id} (issuedQuantity) and, with LIST_CHECK=1 (default), the
// coupons of every user 1..VUS: the users holding this coupon must be exactly the number
// issued, none twice.
//
// Thresholds (the issue's targets): exactly min(STOCK, VUS) users ended on 200
// (rush_users_issued), issuedQuantity equal to it and to the holders the listings show
// (books_exact), zero 5xx, zero lock timeouts, no user left without an answer, no other
// answer than 200 / 422 COUPON_SOLD_OUT / COUPON_ALREADY_ISSUED, p99 of the issue calls
// < 50 ms (P99_MS; NO_LATENCY_THRESHOLDS=1 drops it).
//
// MODE=late COUPON_ID=<a sold-out coupon>: the same users again, each with a FRESH key, on
// the coupon the rush sold out: every answer must be 422 (COUPON_SOLD_OUT, or
// COUPON_ALREADY_ISSUED for the holders) and nothing issued. With ONLY_ISSUE=1 this run
// sends nothing but those issue requests, so the database's statement counter read around
// it (bench/scenarios/coupon_rush.py) shows what refusals after the sell-out cost the
// database: nothing, when the admission gate answers them.
//
// The rush's own timing, reported as Trends of milliseconds since the start (the end of
// setup() + START_DELAY_MS, 1000 by default, which every VU waits for before it sends):
// rush_sent_ms (each VU's first send), rush_answered_ms (each VU's final answer),
// rush_issued_ms (each 200): rush requests/s = issue requests / (max answered - min sent);
// max of rush_issued_ms is when the last unit went.
//
//   k6 run k6/coupon-rush.js
//   VUS=200 STOCK=20 k6 run k6/coupon-rush.js
//   MODE=late COUPON_ID=7 k6 run k6/coupon-rush.js
//   MODE=late COUPON_ID=7 ONLY_ISSUE=1 k6 run k6/coupon-rush.js
import { check, sleep } from 'k6';
import http from 'k6/http';
import { Counter, Gauge, Rate, Trend } from 'k6/metrics';
import {
  BASE_URL, createCoupon, envDuration, envFlag, envInt, get, headers, isInt, issueCoupon, json,
  latencyThresholds, newKey, problemCode, replayed, reportServer, scrapeServer,
} from './lib.js';

const VUS = envInt('VUS', 1000, 1);
const STOCK = envInt('STOCK', 100, 1);
const DISCOUNT = envInt('DISCOUNT', 5000, 1);
const USER_OFFSET = envInt('USER_OFFSET', 0, 0);
const MAX_TRIES = envInt('MAX_TRIES', 30, 1);
const TIMEOUT = envDuration('TIMEOUT', '10s');
const MODE = __ENV.MODE || 'rush';
if (!['rush', 'late'].includes(MODE)) throw new Error(`MODE must be rush or late, got "${MODE}"`);
const COUPON_ID = __ENV.COUPON_ID ? envInt('COUPON_ID', 0, 1) : null;
if (MODE === 'late' && COUPON_ID === null) throw new Error('MODE=late needs COUPON_ID (the coupon a rush sold out)');
// ONLY_ISSUE=1: nothing but the issue requests (no readiness probe, no reads of the coupon,
// no warm-up, no listings, no /metrics), for a statement count read around the run; the
// coupon is taken to be COUPON_ID with STOCK units, all issued (MODE=late only).
const ONLY_ISSUE = envFlag('ONLY_ISSUE');
if (ONLY_ISSUE && MODE !== 'late') throw new Error('ONLY_ISSUE=1 is for MODE=late (the books are not read)');
const WARM = !ONLY_ISSUE && (__ENV.WARM || '1') !== '0';
const LIST_CHECK = !ONLY_ISSUE && (__ENV.LIST_CHECK || '1') !== '0';
// Every VU waits for this many ms after setup() and then sends: VUs get going one by one
// (a thousand JS runtimes), and a rush is everyone at the same instant.
const START_DELAY_MS = envInt('START_DELAY_MS', 1000, 0);
// How many users must end on 200: every unit of a fresh coupon (or every VU, if fewer);
// none when late. EXPECT_ISSUED overrides it (a coupon given by COUPON_ID, partly issued).
const EXPECT = __ENV.EXPECT_ISSUED !== undefined && __ENV.EXPECT_ISSUED !== ''
  ? envInt('EXPECT_ISSUED', 0, 0)
  : (MODE === 'late' ? 0 : (COUPON_ID === null ? Math.min(STOCK, VUS) : null));

// 200 and 422 are answers; anything else is a failed request (and retried, if retryable).
const ANSWERS = http.expectedStatuses(200, 422);
const REFUSALS = ['COUPON_SOLD_OUT', 'COUPON_ALREADY_ISSUED', 'COUPON_NOT_OPEN'];

const usersIssued = new Counter('rush_users_issued');
const usersSoldOut = new Counter('rush_users_sold_out');
const usersAlready = new Counter('rush_users_already_issued');
const usersNotOpen = new Counter('rush_users_not_open');
const usersUnexpected = new Counter('rush_users_unexpected_answer');
const usersUnanswered = new Counter('rush_users_unanswered');
const answers5xx = new Counter('issue_5xx');
const lockTimeouts = new Counter('issue_lock_timeouts');
const inUse = new Counter('issue_409_in_use');
const networkErrors = new Counter('issue_network_errors');
const replays = new Counter('issue_replayed_200');
const retries = new Counter('issue_retries');
const tries = new Trend('issue_tries');
const sentAt = new Trend('rush_sent_ms');
const answeredAt = new Trend('rush_answered_ms');
const issuedAt = new Trend('rush_issued_ms');
const couponIdGauge = new Gauge('rush_coupon_id');
const issuedQuantity = new Gauge('coupon_issued_quantity');
const holders = new Gauge('coupon_holders_listed');
const exact = new Rate('books_exact');

const thresholds = Object.assign(
  {
    books_exact: ['rate==1'],
    checks: ['rate==1'],
    issue_5xx: ['count==0'],
    issue_lock_timeouts: ['count==0'],
    rush_users_unanswered: ['count==0'],
    rush_users_unexpected_answer: ['count==0'],
    rush_users_sold_out: [],
    rush_users_already_issued: [],
    issue_tries: [],
    'http_reqs{name:issue}': [],
  },
  latencyThresholds('http_req_duration{name:issue}', { p99: 50 }),
);
if (EXPECT !== null) thresholds.rush_users_issued = [`count==${EXPECT}`];
if (MODE === 'late') thresholds.rush_users_not_open = ['count==0'];

export const options = {
  scenarios: {
    rush: { executor: 'per-vu-iterations', vus: VUS, iterations: 1, maxDuration: '5m', gracefulStop: '30s' },
  },
  setupTimeout: '5m',
  teardownTimeout: '5m',
  thresholds,
  summaryTrendStats: ['avg', 'min', 'med', 'p(90)', 'p(95)', 'p(99)', 'max'],
};

function readCoupon(id) {
  const r = get(`/api/coupons/${id}`, 'setup coupon');
  const b = json(r);
  if (r.status !== 200 || !b || !isInt(b.issuedQuantity) || !isInt(b.totalQuantity)) {
    throw new Error(`GET /api/coupons/${id}: ${r.status} ${problemCode(r)} ${r.error || ''}`);
  }
  return b;
}

// Each user's balance once, 50 at a time: the users exist (else the run stops here) and the
// service has seen them (the rush measures issuing, not first reads).
function warmUsers() {
  for (let from = 1; from <= VUS; from += 50) {
    const reqs = [];
    for (let n = from; n < from + 50 && n <= VUS; n++) {
      reqs.push({ method: 'GET', url: `${BASE_URL}/api/users/${USER_OFFSET + n}/balance`, params: { headers: headers(), tags: { name: 'setup warm' } } });
    }
    const res = http.batch(reqs);
    res.forEach((r, i) => {
      const user = USER_OFFSET + from + i;
      if (r.status === 401) throw new Error('401 UNAUTHORIZED: the service has API_TOKEN set; pass the same API_TOKEN to k6');
      if (r.status !== 200) {
        throw new Error(`user ${user} answered ${r.status} (${problemCode(r)} ${r.error || ''}): the rush needs users ${USER_OFFSET + 1}..${USER_OFFSET + VUS} (balance-service seed --users ${USER_OFFSET + VUS} --balance 100000)`);
      }
    });
  }
}

export function setup() {
  if (ONLY_ISSUE) {
    console.log(`coupon-rush: MODE=late ONLY_ISSUE=1 coupon ${COUPON_ID} (taken as ${STOCK} of ${STOCK} issued), ${VUS} users ${USER_OFFSET + 1}..${USER_OFFSET + VUS}`);
    return { coupon: COUPON_ID, total: STOCK, before: STOCK, server: null, t0: Date.now() + START_DELAY_MS };
  }
  const ready = http.get(`${BASE_URL}/health/ready`, { tags: { name: 'setup' } });
  if (ready.status !== 200) throw new Error(`${BASE_URL}/health/ready answered ${ready.status} ${ready.error || ''}: is the service running?`);
  let coupon;
  if (COUPON_ID === null) {
    const r = createCoupon({ name: `RUSH-${Date.now()}`, discount: DISCOUNT, totalQuantity: STOCK, validForDays: 30 });
    coupon = json(r);
    if (r.status === 401 || r.status === 403) throw new Error(`POST /api/coupons answered ${r.status}: it needs the admin token (API_TOKEN)`);
    if (r.status !== 201 || !coupon || !isInt(coupon.couponId)) throw new Error(`POST /api/coupons: ${r.status} ${r.body}`);
  } else {
    coupon = readCoupon(COUPON_ID);
  }
  if (WARM) warmUsers();
  const server = scrapeServer();
  console.log(`coupon-rush: MODE=${MODE} coupon ${coupon.couponId} (${coupon.issuedQuantity} of ${coupon.totalQuantity} issued), ${VUS} users ${USER_OFFSET + 1}..${USER_OFFSET + VUS}`);
  return { coupon: coupon.couponId, total: coupon.totalQuantity, before: coupon.issuedQuantity, server, t0: Date.now() + START_DELAY_MS };
}

function backoff(n, res) {
  let s = Math.min(1, 0.02 * 2 ** n) * (0.5 + Math.random() / 2);
  const ra = Number(res.headers['Retry-After']);
  if (Number.isFinite(ra) && ra > 0) s = Math.max(s, Math.min(5, ra));
  return s;
}

export default function (data) {
  const userId = USER_OFFSET + __VU;
  const key = newKey();
  const wait = data.t0 - Date.now();
  if (wait > 0) sleep(wait / 1000);
  sentAt.add(Date.now() - data.t0);
  let final = null;
  let n = 0;
  for (; n < MAX_TRIES; n++) {
    const res = issueCoupon(data.coupon, userId, key, {}, ANSWERS, TIMEOUT);
    if (res.status === 200 || res.status === 422) {
      final = res;
      break;
    }
    if (res.status === 0) networkErrors.add(1);
    else if (res.status >= 500) {
      answers5xx.add(1);
      if (problemCode(res) === 'LOCK_TIMEOUT') lockTimeouts.add(1);
    } else if (res.status === 409 && problemCode(res) === 'IDEMPOTENCY_KEY_IN_USE') inUse.add(1);
    else {
      final = res; // any other answer is final, and wrong
      break;
    }
    retries.add(1);
    sleep(backoff(n, res));
  }
  tries.add(Math.min(n + 1, MAX_TRIES));
  answeredAt.add(Date.now() - data.t0);
  if (final === null) {
    usersUnanswered.add(1);
    return;
  }
  const body = json(final);
  const code = problemCode(final);
  if (final.status === 200) {
    usersIssued.add(1);
    issuedAt.add(Date.now() - data.t0);
    if (replayed(final)) replays.add(1);
    check(final, {
      'a 200 is this user coupon: AVAILABLE, of the coupon and the user': () =>
        body !== null && isInt(body.userCouponId) && body.couponId === data.coupon && body.userId === userId &&
        body.status === 'AVAILABLE' && body.discount === DISCOUNT && typeof body.expiresAt === 'string',
      'a replayed 200 only after a lost answer': () => !replayed(final) || n > 0,
    });
  } else if (final.status === 422 && code === 'COUPON_SOLD_OUT') usersSoldOut.add(1);
  else if (final.status === 422 && code === 'COUPON_ALREADY_ISSUED') usersAlready.add(1);
  else if (final.status === 422 && code === 'COUPON_NOT_OPEN') usersNotOpen.add(1);
  else usersUnexpected.add(1);
  check(final, {
    'answered 200 or 422 with a coupon refusal': (r) => r.status === 200 || (r.status === 422 && REFUSALS.includes(code)),
  });
}

// The books after the rush, read through the API: the coupon's count, and who holds it.
export function teardown(data) {
  couponIdGauge.add(data.coupon);
  if (ONLY_ISSUE) return;
  if (data.server) reportServer(data.server);
  const r = get(`/api/coupons/${data.coupon}`, 'teardown coupon');
  const c = json(r);
  const after = r.status === 200 && c && isInt(c.issuedQuantity) ? c.issuedQuantity : -1;
  issuedQuantity.add(after);
  const problems = [];
  if (after < 0) problems.push(`GET /api/coupons/${data.coupon}: ${r.status}`);
  if (after > data.total) problems.push(`issuedQuantity ${after} above the stock ${data.total}`);
  if (EXPECT !== null && after !== data.before + EXPECT) problems.push(`issuedQuantity ${after}, expected ${data.before} + ${EXPECT}`);
  let listed = null;
  if (LIST_CHECK) {
    listed = 0;
    for (let from = 1; from <= VUS; from += 50) {
      const reqs = [];
      for (let n = from; n < from + 50 && n <= VUS; n++) {
        reqs.push({ method: 'GET', url: `${BASE_URL}/api/users/${USER_OFFSET + n}/coupons`, params: { headers: headers(), tags: { name: 'teardown list' } } });
      }
      http.batch(reqs).forEach((res, i) => {
        const user = USER_OFFSET + from + i;
        const b = json(res);
        if (res.status !== 200 || !b || !Array.isArray(b.items)) {
          problems.push(`GET /api/users/${user}/coupons: ${res.status}`);
          return;
        }
        const mine = b.items.filter((it) => it.couponId === data.coupon);
        if (mine.length > 1) problems.push(`user ${user} holds ${mine.length} of coupon ${data.coupon}`);
        if (mine.some((it) => it.userId !== user)) problems.push(`user ${user} lists another user's coupon`);
        if (mine.length > 0) listed += 1;
      });
    }
    holders.add(listed);
    // Only this run's users touched a fresh coupon, so they hold all of it.
    if (COUPON_ID === null && listed !== after) problems.push(`${listed} users hold the coupon, issuedQuantity ${after}`);
  }
  exact.add(problems.length === 0);
  check(null, { 'the books: issuedQuantity = units issued (<= stock), one per user': () => problems.length === 0 });
  console.log(`coupon-rush: coupon ${data.coupon}: issuedQuantity ${data.before} -> ${after} of ${data.total}` +
    (listed === null ? '' : `, ${listed} of users ${USER_OFFSET + 1}..${USER_OFFSET + VUS} hold it`) +
    (problems.length ? `; PROBLEMS: ${problems.slice(0, 5).join('; ')}` : ''));
}
