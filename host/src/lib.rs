//! The metricsd host: configuration, plugin loader, scheduler, pipeline, delivery and HTTP.
//!
//! The binary (`src/main.rs`) is a thin CLI over [`agent`]. Modules are named for one concern
//! each.

#![warn(missing_docs)]

pub mod agent;
pub mod aggregate;
pub mod call_thread;
pub mod config;
pub mod delivery;
pub mod events;
pub mod health;
pub mod healthcheck;
pub mod http;
pub mod instance;
pub mod isolation;
pub mod loader;
pub mod pipeline;
pub mod plugin_log;
pub mod process;
pub use metricsd_plugin_api::ratelimit;
pub mod scheduler;
pub mod spool;
pub mod webconfig;
