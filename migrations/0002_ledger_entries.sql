-- Every balance change, written in the same transaction as the change itself, so a
-- user's entries always sum to the balance (CHARGE adds, USE and PAYMENT subtract).
create table ledger_entries (
    -- Also the history cursor: pages go backwards by id.
    id bigint not null auto_increment,
    user_id bigint not null,
    -- CHARGE, USE or PAYMENT.
    kind varchar(16) not null,
    -- Always positive; `kind` gives the direction.
    amount bigint not null,
    -- The user's balance right after this entry.
    balance_after bigint not null,
    -- The request's key, case-sensitive; null only for seeded opening balances.
    idempotency_key varchar(255) character set ascii collate ascii_bin null,
    created_at datetime(3) not null,
    primary key (id),
    -- Serves `where user_id = ? and id < ? order by id desc limit ?` without a sort.
    key ledger_entries_user_id_id (user_id, id),
    constraint ledger_entries_amount_positive check (amount > 0),
    constraint ledger_entries_kind_known check (kind in ('CHARGE', 'USE', 'PAYMENT'))
) engine = innodb default charset = utf8mb4;
