-- Coupons, first come first served: a limited stock issued at most once per user, and
-- spent on a payment.
--
-- Issuing is one transaction in the user's key space: the users row's version (the balance
-- stays), the user_coupons row, the key's record, and last the coupon's issued count,
-- guarded (`… where id = ? and issued_quantity < total_quantity`). The coupons row is the
-- one every issue of a rush updates, so it is written last: its row lock is held only from
-- that update to the commit.
--
-- No foreign keys, as everywhere in this schema (see 0001): an FK check from user_coupons
-- would take a shared lock on the hot coupons row at every insert, and from payments one on
-- the user coupon.
--
-- Every statement runs on MySQL 8 (8.0.19+ for `drop constraint`) and MariaDB 10.11, and
-- none uses RETURNING. The new columns of existing tables have defaults or are nullable, so
-- instances of the previous version keep inserting during a rolling upgrade. Adding a CHECK
-- constraint to an existing table copies it on both servers (every row is checked), with
-- writes to it waiting meanwhile: on a large ledger run `migrate` when traffic is low.

-- A kind of coupon and its stock.
create table coupons (
    id bigint not null auto_increment,
    -- 1 to 100 characters, compared as written.
    name varchar(100) character set utf8mb4 collate utf8mb4_bin not null,
    -- In won, taken off an order's amount (never below 0).
    discount bigint not null,
    total_quantity int not null,
    -- How many were issued: always the number of the coupon's user_coupons rows. Raised
    -- only by the guarded update above; the check is the last line of defence of "never
    -- more than the stock".
    issued_quantity int not null default 0,
    -- The issuing window, UTC: open from `issue_starts_at` until (excluded) `issue_ends_at`;
    -- null: never closes.
    issue_starts_at datetime(3) not null,
    issue_ends_at datetime(3) null,
    -- A user coupon expires this many days after it was issued.
    valid_for_days int not null,
    created_at datetime(3) not null,
    primary key (id),
    constraint coupons_discount_positive check (discount > 0),
    constraint coupons_total_quantity_positive check (total_quantity >= 1),
    constraint coupons_issued_within_stock check (issued_quantity >= 0 and issued_quantity <= total_quantity),
    constraint coupons_valid_for_days_range check (valid_for_days between 1 and 3650)
) engine = innodb default charset = utf8mb4;

-- One coupon issued to one user.
create table user_coupons (
    id bigint not null auto_increment,
    coupon_id bigint not null,
    user_id bigint not null,
    -- The coupon's discount when it was issued.
    discount bigint not null,
    -- The payment using it (then it is USED); null while it is free. A payment refunded in
    -- full sets it back to null.
    payment_id bigint null,
    issued_at datetime(3) not null,
    -- Usable while now < expires_at.
    expires_at datetime(3) not null,
    -- The key of the request that issued it, case-sensitive.
    idempotency_key varchar(255) character set ascii collate ascii_bin not null,
    primary key (id),
    -- One per user and coupon, whatever key the request used: the database itself refuses
    -- a second one. Also serves `where coupon_id = ?` (the gate's rebuild, the audit).
    unique key user_coupons_coupon_user (coupon_id, user_id),
    -- A payment uses at most one coupon (nulls do not collide).
    unique key user_coupons_payment_id (payment_id),
    -- Serves `where user_id = ? order by id desc limit ?` (newest first) without a sort.
    key user_coupons_user_id_id (user_id, id),
    constraint user_coupons_discount_positive check (discount > 0)
) engine = innodb default charset = utf8mb4;

-- A payment with a coupon: `amount` is what the balance paid (the order's amount less
-- `discount`, possibly 0), and `user_coupon_id` the coupon spent. Both 0 and null for a
-- payment without one, and for every payment written before this migration.
alter table payments
    add column discount bigint not null default 0,
    add column user_coupon_id bigint null,
    add constraint payments_discount_non_negative check (discount >= 0);

-- A payment a coupon covered in full takes 0 from the balance: its PAYMENT entry has amount
-- 0 (still written, so every payment has its entry). Every other entry stays positive.
alter table ledger_entries drop constraint ledger_entries_amount_positive;
alter table ledger_entries
    add constraint ledger_entries_amount_valid check (amount > 0 or (kind = 'PAYMENT' and amount = 0));

-- idempotency_records.operation needs nothing: 0007 added it as a varchar(16) without a
-- check, and 'COUPON_ISSUE' fits.
