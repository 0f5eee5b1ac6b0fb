-- Orders to pay from the balance: created PENDING, made PAID by the payment step.
create table orders (
    id bigint not null auto_increment,
    user_id bigint not null,
    -- In won; the amount the payment takes from the balance.
    amount bigint not null,
    -- PENDING or PAID; the payment step flips it with `... and status = 'PENDING'`.
    status varchar(16) not null default 'PENDING',
    created_at datetime(3) not null,
    -- Null while PENDING.
    paid_at datetime(3) null,
    primary key (id),
    key orders_user_id (user_id),
    constraint orders_amount_positive check (amount > 0),
    constraint orders_status_known check (status in ('PENDING', 'PAID'))
) engine = innodb default charset = utf8mb4;
