//! Cluster service: MemberList reports this server as the one member, shaped as
//! etcd's answer (its header carries no revision; the peer URLs are the advertised
//! ones, though nothing listens there); membership changes answer Unimplemented
//! (a keyspace has one writer; HA comes later).

use pgetcd_engine::Engine;
use pgetcd_proto::etcdserverpb::{
    Member, MemberListRequest, MemberListResponse, ResponseHeader, cluster_server::Cluster,
};
use tonic::{Request, Response, Status};

/// etcd's Cluster service.
pub struct ClusterService {
    engine: Engine,
    name: String,
    peer_urls: Vec<String>,
    client_urls: Vec<String>,
}

impl ClusterService {
    /// The service naming this member `name`, reachable at `client_urls`, with
    /// `peer_urls` reported as its peer URLs.
    pub fn new(
        engine: Engine,
        name: String,
        peer_urls: Vec<String>,
        client_urls: Vec<String>,
    ) -> Self {
        Self {
            engine,
            name,
            peer_urls,
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
        // etcd's cluster service fills only the cluster, member and term.
        let header = ResponseHeader {
            revision: 0,
            ..self.engine.header()
        };
        Ok(Response::new(MemberListResponse {
            header: Some(header),
            members: vec![Member {
                id: self.engine.member_id(),
                name: self.name.clone(),
                peer_ur_ls: self.peer_urls.clone(),
                client_ur_ls: self.client_urls.clone(),
                is_learner: false,
            }],
        }))
    }
}
