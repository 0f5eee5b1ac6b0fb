-- What each stored answer was, next to its bytes: the operation (CHARGE, USE, PAYMENT; later
-- operations add their own names) and its outcome (APPLIED: the effect committed with the
-- record; REFUSED: a business refusal, nothing else written). The atomic step writes both,
-- so the audit and the request lookup never infer what happened from the HTTP status.
--
-- Rolling upgrade: both columns are nullable without a default, so MySQL 8 and MariaDB
-- 10.11 add them in place (no table copy), and instances of the previous version, which do
-- not name them, keep inserting while the upgrade runs. Their rows have both columns null;
-- every reader treats such a row by the rule of the backfill below, in one function
-- (`record_facts` in crates/mysql-repo/src/convert.rs). A later migration, once no older
-- instance runs, can backfill those rows the same way and make the columns not null.
--
-- The `status` column stays: instances of the previous version insert it and filter on
-- it, so dropping it here would break them mid-upgrade. This version still writes
-- 'COMPLETED' into it and reads nothing from it; it can go once no older instance runs.
alter table idempotency_records
    add column operation varchar(16) null,
    add column outcome varchar(16) null;

-- The one backfill of rows written before this version, by the rule those versions kept:
-- the operation is the fingerprint's prefix, and every stored success was a 2xx that
-- applied its effect and every stored refusal was not a 2xx. One statement: it scans the
-- table and its row locks make concurrent inserts of new keys wait until it commits, so on
-- a large table run `migrate` when traffic is low.
update idempotency_records
set operation = case
        when fingerprint like 'charge:%' then 'CHARGE'
        when fingerprint like 'use:%' then 'USE'
        when fingerprint like 'payment:%' then 'PAYMENT'
    end,
    outcome = case when response_status between 200 and 299 then 'APPLIED' else 'REFUSED' end
where operation is null and outcome is null;
