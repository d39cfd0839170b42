//! Cluster service: MemberList reports every live instance of the keyspace (registered
//! within the last few seconds), shaped as etcd's answer (its header carries no
//! revision; the peer URLs are the reported ones, though nothing listens there).
//! MemberRemove forgets an instance that is gone for good (and drops its replication
//! slot); the other membership changes answer Unimplemented (instances join by starting).

use crate::node::Node;
use pgetcd_proto::etcdserverpb::{
    Member, MemberListRequest, MemberListResponse, MemberRemoveRequest, MemberRemoveResponse,
    ResponseHeader, cluster_server::Cluster,
};
use pgetcd_storage::MemberInfo;
use tonic::{Request, Response, Status};

/// etcd's Cluster service.
pub struct ClusterService {
    node: Node,
    name: String,
    peer_urls: Vec<String>,
    client_urls: Vec<String>,
}

impl ClusterService {
    /// The service naming this member `name`, reachable at `client_urls`, with
    /// `peer_urls` reported as its peer URLs.
    pub fn new(node: Node, name: String, peer_urls: Vec<String>, client_urls: Vec<String>) -> Self {
        Self {
            node,
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
        Ok(Response::new(MemberListResponse {
            header: Some(self.header()),
            members: self.listed(self.node.members()),
        }))
    }

    async fn member_remove(
        &self,
        req: Request<MemberRemoveRequest>,
    ) -> Result<Response<MemberRemoveResponse>, Status> {
        let left = self.node.remove_member(req.get_ref().id).await?;
        Ok(Response::new(MemberRemoveResponse {
            header: Some(self.header()),
            members: self.listed(left),
        }))
    }
}

impl ClusterService {
    /// etcd's cluster service fills only the cluster, member and term.
    fn header(&self) -> ResponseHeader {
        ResponseHeader {
            revision: 0,
            ..self.node.engine().header()
        }
    }

    /// Members as etcd lists them.
    fn listed(&self, members: Vec<MemberInfo>) -> Vec<Member> {
        members
            .into_iter()
            .map(|m| {
                if m.name == self.name {
                    // This instance as it serves now (its URLs with the ports bound).
                    Member {
                        id: m.member_id,
                        name: self.name.clone(),
                        peer_ur_ls: self.peer_urls.clone(),
                        client_ur_ls: self.client_urls.clone(),
                        is_learner: false,
                    }
                } else {
                    Member {
                        id: m.member_id,
                        name: m.name,
                        peer_ur_ls: m.peer_urls,
                        client_ur_ls: m.client_urls,
                        is_learner: false,
                    }
                }
            })
            .collect()
    }
}
