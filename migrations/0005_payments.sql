-- Completed payments, one per order at most, written in the same transaction as the
-- balance change, its ledger entry and the order's PAID status.
create table payments (
    id bigint not null auto_increment,
    -- Unique: the database itself refuses a second payment of one order.
    order_id bigint not null,
    user_id bigint not null,
    amount bigint not null,
    -- The user's balance right after this payment.
    balance_after bigint not null,
    paid_at datetime(3) not null,
    -- The key of the request that paid, case-sensitive, for tracing a payment to its call.
    idempotency_key varchar(255) character set ascii collate ascii_bin not null,
    primary key (id),
    unique key payments_order_id (order_id)
) engine = innodb default charset = utf8mb4;
