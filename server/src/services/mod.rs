//! The etcd gRPC services. Each handler validates nothing itself: the engine does, so
//! every entry point shares one set of etcd checks and errors.

mod cluster;
mod kv;
mod maintenance;
mod unimplemented;
mod watch;

pub use cluster::ClusterService;
pub use kv::KvService;
pub use maintenance::MaintenanceService;
pub use unimplemented::{AuthService, LeaseService};
pub use watch::{WatchService, WatchSettings};
