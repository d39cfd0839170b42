//! The etcd gRPC services. Each handler validates nothing itself: the engine does, so
//! every entry point shares one set of etcd checks and errors.

mod cluster;
mod kv;
mod lease;
mod maintenance;
mod unimplemented;
mod watch;

pub use cluster::ClusterService;
pub use kv::KvService;
pub use lease::LeaseService;
pub use maintenance::{ETCD_CLUSTER_VERSION, ETCD_VERSION, MaintenanceService};
pub use unimplemented::AuthService;
pub(crate) use watch::DUPLICATE_ID;
pub use watch::{WatchService, WatchSettings};
