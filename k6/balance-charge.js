// The original's load test: spread charges over 100 users, ramping to 1000 VUs.
//
// Stages (TIME_SCALE=1, MAX_VUS=1000): 30 s -> 100 VUs, 1 m at 100, 30 s -> 500,
// 1 m at 500, 30 s -> 1000, 1 m at 1000, 30 s -> 0. Each iteration charges 10000 to
// user (VU % 100) + 1 with a fresh UUID key, checks 200 and a numeric `balance`, then
// sleeps 1 s. Expected (the original's figures): 100% checks, 0% failed requests,
// p95 < 150 ms, p99 < 300 ms.
//
//   k6 run k6/balance-charge.js
//   TIME_SCALE=0.02 MAX_VUS=5 NO_LATENCY_THRESHOLDS=1 k6 run k6/balance-charge.js   # ~7 s smoke
import { check, sleep } from 'k6';
import { Counter, Rate } from 'k6/metrics';
import {
  charge, envInt, envNumber, isInt, json, latencyThresholds, maxVus, newKey, problemCode,
  replayed, requireService, reportServer, scaleStages, scrapeServer, serverThresholds, userForVu,
} from './lib.js';

const PEAK = maxVus(1000);
const AMOUNT = envInt('AMOUNT', 10000, 1);
const SLEEP_S = envNumber('SLEEP', 1);

const STAGES = scaleStages(
  [[30, 100], [60, 100], [30, 500], [60, 500], [30, 1000], [60, 1000], [30, 0]],
  1000,
  PEAK,
);

const chargesApplied = new Counter('charges_applied');
const chargedAmount = new Counter('charged_amount');
const lockTimeouts = new Counter('lock_timeouts');
const chargeOk = new Rate('charge_ok');

export const options = {
  scenarios: {
    balance_charge: { executor: 'ramping-vus', startVUs: 0, stages: STAGES, gracefulRampDown: '10s' },
  },
  thresholds: Object.assign(
    {
      checks: ['rate==1.0'],
      http_req_failed: ['rate==0'],
      charge_ok: ['rate==1.0'],
    },
    latencyThresholds('http_req_duration{name:charge}', { p95: 150, p99: 300 }),
    serverThresholds(),
  ),
  summaryTrendStats: ['avg', 'min', 'med', 'p(90)', 'p(95)', 'p(99)', 'max'],
};

export function setup() {
  requireService();
  return { server: scrapeServer() };
}

export default function () {
  const userId = userForVu(__VU);
  const res = charge(userId, AMOUNT, newKey());
  const body = json(res);
  const ok = check(res, {
    'charge status is 200': (r) => r.status === 200,
    'charge body has a numeric balance': () => body !== null && isInt(body.balance),
    'charge answers the amount and the user': () => body !== null && body.chargedAmount === AMOUNT && body.userId === userId,
    'a fresh key is not a replay': (r) => !replayed(r),
  });
  chargeOk.add(ok);
  if (res.status === 200) {
    chargesApplied.add(1);
    chargedAmount.add(AMOUNT);
  } else if (problemCode(res) === 'LOCK_TIMEOUT') {
    lockTimeouts.add(1);
  }
  if (SLEEP_S > 0) sleep(SLEEP_S);
}

export function teardown(data) {
  reportServer(data.server);
}
