// Shared helpers of the k6 scripts: configuration from __ENV, request headers,
// idempotency keys, stage scaling, response parsing and a scrape of the service's
// /metrics. Only k6's own modules: no remote imports.
import http from 'k6/http';
import { Gauge } from 'k6/metrics';

// ---------------------------------------------------------------- configuration

function envString(name, fallback) {
  const v = __ENV[name];
  return v === undefined || v === '' ? fallback : v;
}

export function envNumber(name, fallback) {
  const raw = envString(name, undefined);
  if (raw === undefined) return fallback;
  const n = Number(raw);
  if (!Number.isFinite(n)) throw new Error(`${name} must be a number, got "${raw}"`);
  return n;
}

export function envInt(name, fallback, min) {
  const n = envNumber(name, fallback);
  if (!Number.isInteger(n) || (min !== undefined && n < min)) {
    throw new Error(`${name} must be an integer${min !== undefined ? ` >= ${min}` : ''}, got "${__ENV[name]}"`);
  }
  return n;
}

// 1, true, yes, on (any case) are true; anything else, or unset, is false.
export function envFlag(name) {
  return /^(1|true|yes|on)$/i.test(envString(name, ''));
}

export function envDuration(name, fallback) {
  const v = envString(name, fallback);
  if (!/^(\d+(\.\d+)?(ms|s|m|h))+$/.test(v)) throw new Error(`${name} must be a k6 duration such as 30s or 1m30s, got "${v}"`);
  return v;
}

export const BASE_URL = envString('BASE_URL', 'http://127.0.0.1:8080').replace(/\/+$/, '');
// Every stage duration is multiplied by TIME_SCALE (0.02 turns the 6-minute profile into ~7 s).
export const TIME_SCALE = envNumber('TIME_SCALE', 1);
if (!(TIME_SCALE > 0)) throw new Error(`TIME_SCALE must be > 0, got ${TIME_SCALE}`);
// Users 1..USERS must exist (the service seeds 1..100 by default).
export const USERS = envInt('USERS', 100, 1);
// Where the idempotency key goes: body (as the original did), header, or both (same value).
export const KEY_IN = envString('KEY_IN', 'both');
if (!['body', 'header', 'both'].includes(KEY_IN)) throw new Error(`KEY_IN must be body, header or both, got "${KEY_IN}"`);
// Set when the service runs with API_TOKEN.
const API_TOKEN = envString('API_TOKEN', '');

// MAX_VUS: the peak number of VUs of a script; each script has its own default.
export function maxVus(defaultPeak) {
  return envInt('MAX_VUS', defaultPeak, 1);
}

// ---------------------------------------------------------------- stages and scaling

// A duration in seconds, scaled by TIME_SCALE, as a k6 duration string (at least 1 s).
export function scaledDuration(seconds) {
  return `${Math.max(1, Math.round(seconds * TIME_SCALE))}s`;
}

// A VU count or rate given for a peak of `basePeak`, scaled to a peak of `peak`.
// Zero stays zero; anything else is at least 1.
export function scaleCount(n, basePeak, peak) {
  if (n === 0) return 0;
  return Math.max(1, Math.round((n * peak) / basePeak));
}

// stages: [[seconds, target], ...] written for a peak of basePeak VUs.
export function scaleStages(stages, basePeak, peak) {
  return stages.map(([seconds, target]) => ({
    duration: scaledDuration(seconds),
    target: scaleCount(target, basePeak, peak),
  }));
}

export function totalSeconds(stages) {
  return stages.reduce((sum, s) => sum + parseInt(s.duration, 10), 0);
}

// ---------------------------------------------------------------- thresholds

// Latency thresholds, unless NO_LATENCY_THRESHOLDS is set (smoke runs on a loaded CI
// box). P95_MS / P99_MS override the script's figures; an empty list still makes k6
// report the (sub)metric.
export function latencyThresholds(metric, { p95, p99 } = {}) {
  if (envFlag('NO_LATENCY_THRESHOLDS')) return { [metric]: [] };
  const list = [];
  const p95ms = envNumber('P95_MS', p95);
  const p99ms = envNumber('P99_MS', p99);
  if (p95ms !== undefined) list.push(`p(95)<${p95ms}`);
  if (p99ms !== undefined) list.push(`p(99)<${p99ms}`);
  return { [metric]: list };
}

// ---------------------------------------------------------------- requests

export function newKey() {
  return crypto.randomUUID();
}

export function headers(extra) {
  const h = { 'Content-Type': 'application/json', Accept: 'application/json' };
  if (API_TOKEN) h.Authorization = `Bearer ${API_TOKEN}`;
  return Object.assign(h, extra || {});
}

// Body and params of an idempotent request (charge, use, payment, refund), the key placed per KEY_IN.
export function keyed(body, key, params) {
  const b = Object.assign({}, body);
  const extra = {};
  if (KEY_IN !== 'header') b.idempotencyKey = key;
  if (KEY_IN !== 'body') extra['Idempotency-Key'] = key;
  const p = Object.assign({}, params || {});
  p.headers = headers(Object.assign(extra, p.headers || {}));
  return { body: JSON.stringify(b), params: p };
}

// User (VU % USERS) + 1: the original's fixed spread over the seeded users.
export function userForVu(vu) {
  return (vu % USERS) + 1;
}

export function randomUser() {
  return Math.floor(Math.random() * USERS) + 1;
}

export function randomInt(min, max) {
  return Math.floor(Math.random() * (max - min + 1)) + min;
}

export function charge(userId, amount, key, tags) {
  const { body, params } = keyed({ amount }, key, { tags: Object.assign({ name: 'charge' }, tags || {}) });
  return http.post(`${BASE_URL}/api/users/${userId}/balance/charge`, body, params);
}

export function use(userId, amount, key, tags, responseCallback) {
  const extra = { tags: Object.assign({ name: 'use' }, tags || {}) };
  if (responseCallback) extra.responseCallback = responseCallback;
  const { body, params } = keyed({ amount }, key, extra);
  return http.post(`${BASE_URL}/api/users/${userId}/balance/use`, body, params);
}

export function createOrder(userId, amount, tags) {
  return http.post(`${BASE_URL}/api/orders`, JSON.stringify({ userId, amount }), {
    headers: headers(),
    tags: Object.assign({ name: 'order' }, tags || {}),
  });
}

// The request object of a payment, for http.batch or http.request.
export function paymentRequest(orderId, userId, key, tags, responseCallback) {
  const extra = { tags: Object.assign({ name: 'payment' }, tags || {}) };
  if (responseCallback) extra.responseCallback = responseCallback;
  const { body, params } = keyed({ orderId, userId }, key, extra);
  return { method: 'POST', url: `${BASE_URL}/api/payments`, body, params };
}

export function pay(orderId, userId, key, tags, responseCallback) {
  const r = paymentRequest(orderId, userId, key, tags, responseCallback);
  return http.request(r.method, r.url, r.body, r.params);
}

// The request object of a refund of a payment, for http.batch or http.request; `amount`
// undefined refunds the rest, `reason` undefined sends none.
export function refundRequest(paymentId, amount, key, reason, tags, responseCallback) {
  const extra = { tags: Object.assign({ name: 'refund' }, tags || {}) };
  if (responseCallback) extra.responseCallback = responseCallback;
  const b = {};
  if (amount !== undefined) b.amount = amount;
  if (reason !== undefined) b.reason = reason;
  const { body, params } = keyed(b, key, extra);
  return { method: 'POST', url: `${BASE_URL}/api/payments/${paymentId}/refunds`, body, params };
}

export function refund(paymentId, amount, key, reason, tags, responseCallback) {
  const r = refundRequest(paymentId, amount, key, reason, tags, responseCallback);
  return http.request(r.method, r.url, r.body, r.params);
}

// The request object of a cancellation (no key: cancelling twice is cancelling once), for
// http.batch or http.request.
export function cancelRequest(orderId, tags, responseCallback) {
  const params = { headers: headers(), tags: Object.assign({ name: 'cancel' }, tags || {}) };
  if (responseCallback) params.responseCallback = responseCallback;
  return { method: 'POST', url: `${BASE_URL}/api/orders/${orderId}/cancel`, body: '{}', params };
}

export function cancel(orderId, tags, responseCallback) {
  const r = cancelRequest(orderId, tags, responseCallback);
  return http.request(r.method, r.url, r.body, r.params);
}

// POST /api/coupons (an admin operation: API_TOKEN, when the service has one, is the admin's).
export function createCoupon(coupon, tags) {
  return http.post(`${BASE_URL}/api/coupons`, JSON.stringify(coupon), {
    headers: headers(),
    tags: Object.assign({ name: 'create coupon' }, tags || {}),
  });
}

// POST /api/coupons/{id}/issue for a user under a key (placed per KEY_IN).
export function issueCoupon(couponId, userId, key, tags, responseCallback, timeout) {
  const extra = { tags: Object.assign({ name: 'issue' }, tags || {}) };
  if (responseCallback) extra.responseCallback = responseCallback;
  if (timeout) extra.timeout = timeout;
  const { body, params } = keyed({ userId }, key, extra);
  return http.post(`${BASE_URL}/api/coupons/${couponId}/issue`, body, params);
}

export function get(path, name, tags) {
  return http.get(`${BASE_URL}${path}`, { headers: headers(), tags: Object.assign({ name }, tags || {}) });
}

// ---------------------------------------------------------------- responses

export function json(res) {
  try {
    return res.json();
  } catch (_) {
    return null;
  }
}

export function isInt(v) {
  return typeof v === 'number' && Number.isInteger(v);
}

export function replayed(res) {
  return (res.headers['Idempotent-Replayed'] || '').toLowerCase() === 'true';
}

// The `code` of an application/problem+json answer, or ''.
export function problemCode(res) {
  const b = json(res);
  return b && typeof b.code === 'string' ? b.code : '';
}

// ---------------------------------------------------------------- setup

// Fails the run at once (non-zero exit) when the service is unreachable or the users the
// script expects are missing, rather than reporting thousands of failed requests.
export function requireService() {
  const ready = http.get(`${BASE_URL}/health/ready`, { tags: { name: 'setup' } });
  if (ready.status !== 200) {
    throw new Error(`${BASE_URL}/health/ready answered ${ready.status} ${ready.error || ''}: is the service running?`);
  }
  for (const u of [1, USERS]) {
    const r = http.get(`${BASE_URL}/api/users/${u}/balance`, { headers: headers(), tags: { name: 'setup' } });
    if (r.status === 401) throw new Error(`user ${u} answered 401 UNAUTHORIZED: the service has API_TOKEN set; pass the same API_TOKEN to k6`);
    if (r.status !== 200) {
      throw new Error(`user ${u} answered ${r.status} (${problemCode(r)}): the scripts expect users 1..${USERS} (SEED_USERS, or USERS=n here)`);
    }
  }
}

// ---------------------------------------------------------------- the service's /metrics

// Sum of every series of each counter named in `names`, read from the service's
// Prometheus text; null when /metrics cannot be read (SCRAPE_METRICS=0 skips it).
// A counter not yet incremented is absent from the text: it reads 0.
export function scrapeCounters(names) {
  if (envString('SCRAPE_METRICS', '1') === '0') return null;
  const res = http.get(`${BASE_URL}/metrics`, {
    tags: { name: 'metrics' },
    // Whatever it answers, a scrape is no failed request of the load under test.
    responseCallback: http.expectedStatuses({ min: 100, max: 599 }),
  });
  if (res.status !== 200 || typeof res.body !== 'string') return null;
  const out = {};
  for (const n of names) out[n] = 0;
  for (const line of res.body.split('\n')) {
    if (line === '' || line[0] === '#') continue;
    const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)/.exec(line);
    if (m && m[1] in out) out[m[1]] += Number(m[3]);
  }
  return out;
}

// The increase of each counter between two scrapes, or null if either failed.
export function counterDeltas(before, after) {
  if (!before || !after) return null;
  const d = {};
  for (const k of Object.keys(after)) d[k] = after[k] - (before[k] || 0);
  return d;
}

export const SERVER_COUNTERS = [
  'balance_optimistic_conflicts_total',
  'balance_optimistic_exhausted_total',
  'balance_lock_acquired_total',
  'balance_lock_timeouts_total',
  'balance_lock_degraded_total',
  'balance_idempotent_replays_total',
  'balance_idempotency_in_use_total',
  'balance_operations_applied_total',
];

// What the service counted during the run (the increase of its counters between setup
// and teardown), reported as gauges in the summary. With several instances behind one
// BASE_URL this is one instance's share. MAX_OPTIMISTIC_CONFLICTS=n adds a threshold
// (the original's bar after its fix: 0-10 conflicts in the full balance-charge run).
const serverGauges = {
  balance_optimistic_conflicts_total: new Gauge('server_optimistic_conflicts'),
  balance_optimistic_exhausted_total: new Gauge('server_optimistic_exhausted'),
  balance_lock_acquired_total: new Gauge('server_lock_acquired'),
  balance_lock_timeouts_total: new Gauge('server_lock_timeouts'),
  balance_lock_degraded_total: new Gauge('server_lock_degraded'),
  balance_idempotent_replays_total: new Gauge('server_idempotent_replays'),
  balance_idempotency_in_use_total: new Gauge('server_idempotency_in_use'),
  balance_operations_applied_total: new Gauge('server_operations_applied'),
};

export function serverThresholds() {
  const max = envNumber('MAX_OPTIMISTIC_CONFLICTS', undefined);
  return max === undefined ? {} : { server_optimistic_conflicts: [`value<=${max}`] };
}

export function scrapeServer() {
  return scrapeCounters(SERVER_COUNTERS);
}

export function reportServer(before) {
  const d = counterDeltas(before, scrapeServer());
  if (!d) {
    console.log('service counters: /metrics not read (SCRAPE_METRICS=0 or unreachable)');
    return;
  }
  for (const k of Object.keys(serverGauges)) serverGauges[k].add(d[k] || 0);
  console.log(`service counters during the run: ${Object.keys(d).map((k) => `${k}=${d[k]}`).join(' ')}`);
}

// ---------------------------------------------------------------- ledger consistency

// The direction of each ledger entry type: +1 money in, -1 money out. The service's own is
// EntryKind::sign in crates/domain/src/model.rs (the fault suite checks its table,
// LEDGER_SIGN in chaos/lib/common.py, against it); a type missing here breaks the chain
// below rather than being guessed.
export const LEDGER_SIGN = Object.freeze({ CHARGE: 1, USE: -1, PAYMENT: -1, REFUND: 1 });

// Reads a user's balance and the newest `limit` ledger entries and checks that they
// tell one story: the newest entry's balanceAfter is the balance, and every entry's
// balanceAfter is its predecessor's plus (CHARGE, REFUND) or minus (USE, PAYMENT) its
// amount (LEDGER_SIGN). A lost update breaks the chain. Only meaningful when no load runs
// at that moment.
export function ledgerStory(userId, limit) {
  const b = http.get(`${BASE_URL}/api/users/${userId}/balance`, { headers: headers(), tags: { name: 'teardown ledger' } });
  const h = http.get(`${BASE_URL}/api/users/${userId}/balance/history?limit=${limit}`, { headers: headers(), tags: { name: 'teardown ledger' } });
  const bb = json(b);
  const hb = json(h);
  if (b.status !== 200 || h.status !== 200 || !bb || !hb || !Array.isArray(hb.items)) {
    return { ok: false, why: `user ${userId}: balance ${b.status}, history ${h.status}` };
  }
  const items = hb.items;
  if (items.length > 0 && items[0].balanceAfter !== bb.balance) {
    return { ok: false, why: `user ${userId}: balance ${bb.balance} but the newest entry ${items[0].id} says ${items[0].balanceAfter}` };
  }
  for (let i = 0; i + 1 < items.length; i++) {
    const e = items[i];
    const prev = items[i + 1];
    const sign = Object.prototype.hasOwnProperty.call(LEDGER_SIGN, e.type) ? LEDGER_SIGN[e.type] : NaN;
    if (!(e.id > prev.id) || prev.balanceAfter + sign * e.amount !== e.balanceAfter) {
      return { ok: false, why: `user ${userId}: entry ${e.id} (${e.type} ${e.amount} -> ${e.balanceAfter}) does not follow entry ${prev.id} (-> ${prev.balanceAfter})` };
    }
  }
  return { ok: true, entries: items.length };
}
