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
pub use lease::KeepAliveRequests;
pub use lease::LeaseService;
pub use maintenance::{ETCD_CLUSTER_VERSION, ETCD_VERSION, MaintenanceService};
pub use unimplemented::AuthService;
pub(crate) use watch::DUPLICATE_ID;
pub use watch::{WatchRequests, WatchService, WatchSettings};

use pgetcd_proto::etcdserverpb::{LeaseKeepAliveResponse, WatchResponse};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;
use tonic::metadata::MetadataMap;

/// Opens a watch stream over any stream of requests (a gRPC client's, the JSON
/// gateway's, a router's): its responses, or etcd's refusal of the stream.
pub trait OpenWatch: Send + Sync + 'static {
    fn open_watch(
        &self,
        metadata: &MetadataMap,
        inbound: WatchRequests,
    ) -> Result<ReceiverStream<Result<WatchResponse, Status>>, Status>;
}

/// Opens a lease keepalive stream over any stream of requests.
#[tonic::async_trait]
pub trait OpenKeepAlive: Send + Sync + 'static {
    async fn open_keep_alive(
        &self,
        metadata: &MetadataMap,
        inbound: KeepAliveRequests,
    ) -> Result<ReceiverStream<Result<LeaseKeepAliveResponse, Status>>, Status>;
}
