//! `sqlx::migrate!` embeds the migrations at compile time, but on stable Rust it cannot
//! tell cargo to watch the directory, so a new migration file would not be picked up
//! without this.

fn main() {
    println!("cargo:rerun-if-changed=../../migrations");
}
