-- Refunds, order cancellation and the balance at a past time.
--
-- A refund credits the payment's user: a REFUND ledger entry, a refunds row, and the
-- payment's refunded total, in the one transaction of the balance change (as a payment
-- writes its order and payment row). The payment's status is not stored: it follows from
-- `amount` and `refunded_total` alone (COMPLETED at 0, REFUNDED at the amount, else
-- PARTIALLY_REFUNDED), so the two can never disagree.
--
-- Every statement runs on MySQL 8 (8.0.19+ for `drop constraint`) and MariaDB 10.11. Older
-- instances keep working during a rolling upgrade: they never write the new values, and the
-- new column has a default.

-- What the payment's refunds gave back so far. The refund step writes it only over the
-- value it read and never past the amount (`… where refunded_total = ? and refunded_total
-- + ? <= amount`); the check is the last line of defence of "refunds never exceed it".
alter table payments
    add column refunded_total bigint not null default 0,
    add constraint payments_refunded_total_within check (refunded_total >= 0 and refunded_total <= amount);

-- One row per refund, with the payment's user (so it stays on that user's rows, as every
-- other row a balance change writes).
create table refunds (
    id bigint not null auto_increment,
    payment_id bigint not null,
    order_id bigint not null,
    -- The payment's user, whose balance the refund credits.
    user_id bigint not null,
    -- Always positive, at most what was left of the payment.
    amount bigint not null,
    -- The user's balance right after this refund.
    balance_after bigint not null,
    -- The payment's refunded total right after this refund. Unique per payment: two refunds
    -- decided on the same total cannot both commit, whatever else failed.
    refunded_total bigint not null,
    -- The client's words, at most 255 characters; null when none were given.
    reason varchar(255) character set utf8mb4 collate utf8mb4_bin null,
    -- The key of the request that refunded, case-sensitive.
    idempotency_key varchar(255) character set ascii collate ascii_bin not null,
    created_at datetime(3) not null,
    primary key (id),
    -- Serves `where payment_id = ? order by id` (oldest first), and the guard above.
    unique key refunds_payment_total (payment_id, refunded_total),
    constraint refunds_amount_positive check (amount > 0)
) engine = innodb default charset = utf8mb4;

-- Orders may now be cancelled (only while PENDING) and refunded (with their payment).
alter table orders drop constraint orders_status_known;
alter table orders
    add constraint orders_status_known check (status in ('PENDING', 'PAID', 'CANCELLED', 'REFUNDED'));

-- Ledger entries of refunds.
alter table ledger_entries drop constraint ledger_entries_kind_known;
alter table ledger_entries
    add constraint ledger_entries_kind_known check (kind in ('CHARGE', 'USE', 'PAYMENT', 'REFUND'));

-- The balance at a past time is the `balance_after` of the user's newest entry at or before
-- it: `where user_id = ? and created_at <= ? order by created_at desc, id desc limit 1`,
-- one seek on this index however long the ledger. Built online (InnoDB adds a secondary
-- index without blocking writes).
create index ledger_entries_user_created_at on ledger_entries (user_id, created_at, id);
