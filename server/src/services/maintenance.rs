//! Maintenance service: Status (with the keyspace's real size in Postgres) and Alarm
//! GET. The rest answers Unimplemented until it has a true meaning on Postgres.

use pgetcd_engine::Engine;
use pgetcd_proto::etcdserverpb::{
    AlarmRequest, AlarmResponse, StatusRequest, StatusResponse, alarm_request::AlarmAction,
    maintenance_server::Maintenance,
};
use tonic::{Request, Response, Status};

use crate::status::to_status;

/// The etcd version pgetcd reports: kube-apiserver enables watch-progress-based
/// consistent reads from 3.5.13 on, and pgetcd implements that API level.
pub const ETCD_VERSION: &str = "3.5.16";

/// etcd's Maintenance service.
pub struct MaintenanceService {
    engine: Engine,
}

impl MaintenanceService {
    /// The service for `engine`.
    pub fn new(engine: Engine) -> Self {
        Self { engine }
    }
}

#[tonic::async_trait]
impl Maintenance for MaintenanceService {
    async fn alarm(&self, req: Request<AlarmRequest>) -> Result<Response<AlarmResponse>, Status> {
        match AlarmAction::try_from(req.get_ref().action) {
            // No alarm is ever raised yet (no quota), so the list is truthfully empty.
            Ok(AlarmAction::Get) => Ok(Response::new(AlarmResponse {
                header: Some(self.engine.header()),
                alarms: Vec::new(),
            })),
            _ => Err(Status::unimplemented(
                "pgetcd: alarm activate/deactivate is not implemented",
            )),
        }
    }

    async fn status(
        &self,
        _req: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        let db_size = self.engine.db_size().await.map_err(to_status)?;
        let header = self.engine.header();
        let revision = u64::try_from(header.revision).unwrap_or(0);
        Ok(Response::new(StatusResponse {
            version: ETCD_VERSION.to_owned(),
            db_size,
            leader: self.engine.member_id(),
            raft_index: revision,
            raft_term: self.engine.raft_term(),
            raft_applied_index: revision,
            errors: Vec::new(),
            db_size_in_use: db_size,
            is_learner: false,
            header: Some(header),
        }))
    }
}
