//! Cluster service: MemberList reports this server as the one member; membership
//! changes answer Unimplemented (a keyspace has one writer; HA comes later).

use pgetcd_engine::Engine;
use pgetcd_proto::etcdserverpb::{
    Member, MemberListRequest, MemberListResponse, cluster_server::Cluster,
};
use tonic::{Request, Response, Status};

/// etcd's Cluster service.
pub struct ClusterService {
    engine: Engine,
    name: String,
    client_urls: Vec<String>,
}

impl ClusterService {
    /// The service naming this member `name`, reachable at `client_urls`.
    pub fn new(engine: Engine, name: String, client_urls: Vec<String>) -> Self {
        Self {
            engine,
            name,
            client_urls,
        }
    }
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn member_list(
        &self,
        _req: Request<MemberListRequest>,
    ) -> Result<Response<MemberListResponse>, Status> {
        Ok(Response::new(MemberListResponse {
            header: Some(self.engine.header()),
            members: vec![Member {
                id: self.engine.member_id(),
                name: self.name.clone(),
                peer_ur_ls: Vec::new(),
                client_ur_ls: self.client_urls.clone(),
                is_learner: false,
            }],
        }))
    }
}
