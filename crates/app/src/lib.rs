//! The balance service's binary, as a library so tests can build and run it on port 0.

pub mod audit;
pub mod config;
pub mod startup;
pub mod telemetry;

pub use config::{Cli, Command, Config};
pub use startup::Application;
