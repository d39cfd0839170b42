//! Maintenance service: Status (with the keyspace's real size in Postgres), Alarm,
//! HashKV (bit-for-bit etcd's hash of the same history), Defragment (VACUUM of the
//! keyspace's tables), MoveLeader (hands the writer role to another instance) and
//! Snapshot (the etcd bolt file this history would be, see `snapshot`) and Hash (etcd's
//! hash of that file's buckets). Downgrade answers Unimplemented
//! (docs/compatibility.md).

use crate::node::Node;
use pgetcd_proto::etcdserverpb::{
    AlarmMember, AlarmRequest, AlarmResponse, AlarmType, DefragmentRequest, DefragmentResponse,
    HashKvRequest, HashKvResponse, HashRequest, HashResponse, MoveLeaderRequest,
    MoveLeaderResponse, SnapshotRequest, SnapshotResponse, StatusRequest, StatusResponse,
    alarm_request::AlarmAction, maintenance_server::Maintenance,
};
use tonic::{Request, Response, Status};

use crate::status::to_status;

/// The etcd version pgetcd reports: kube-apiserver enables watch-progress-based
/// consistent reads from 3.5.13 on, and pgetcd implements that API level.
pub const ETCD_VERSION: &str = "3.5.16";
/// The cluster version reported by `/version`.
pub const ETCD_CLUSTER_VERSION: &str = "3.5.0";

/// etcd's Maintenance service.
pub struct MaintenanceService {
    node: Node,
}

impl MaintenanceService {
    /// The service for `node`'s engine.
    pub fn new(node: Node) -> Self {
        Self { node }
    }
}

type SnapshotStream = std::pin::Pin<
    Box<dyn futures::Stream<Item = Result<SnapshotResponse, Status>> + Send + 'static>,
>;

#[tonic::async_trait]
impl Maintenance for MaintenanceService {
    async fn snapshot(
        &self,
        _req: Request<SnapshotRequest>,
    ) -> Result<Response<SnapshotStream>, Status> {
        let engine = self.node.engine();
        let export = engine.export().await.map_err(to_status)?;
        let term = engine.raft_term();
        let file = tokio::task::spawn_blocking(move || crate::snapshot::save::write(export, term))
            .await
            .map_err(|e| Status::internal(format!("snapshot: {e}")))?
            .map_err(|e| Status::internal(format!("snapshot: {e}")))?;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::task::spawn_blocking(move || crate::snapshot::save::stream(file, tx));
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    /// etcd's alarms, one per member id and type (member id 0 included), kept in the
    /// keyspace: every instance answers the same. ACTIVATE and DEACTIVATE answer with
    /// the alarm they touched (DEACTIVATE: only if it was raised); GET lists the alarms
    /// of the type asked, or all.
    async fn alarm(&self, req: Request<AlarmRequest>) -> Result<Response<AlarmResponse>, Status> {
        let r = req.get_ref();
        let engine = self.node.engine();
        let touched = AlarmMember {
            member_id: r.member_id,
            alarm: r.alarm,
        };
        let alarms = match AlarmAction::try_from(r.action) {
            Ok(AlarmAction::Get) => engine
                .refresh_alarms()
                .await
                .map_err(to_status)?
                .into_iter()
                .filter(|(_, a)| r.alarm == AlarmType::None as i32 || *a == r.alarm)
                .map(|(member_id, alarm)| AlarmMember { member_id, alarm })
                .collect(),
            Ok(_) if r.alarm == AlarmType::None as i32 => Vec::new(),
            Ok(AlarmAction::Activate) => {
                engine
                    .set_alarm(r.member_id, r.alarm, true)
                    .await
                    .map_err(to_status)?;
                vec![touched]
            }
            Ok(AlarmAction::Deactivate) => {
                let was = engine
                    .set_alarm(r.member_id, r.alarm, false)
                    .await
                    .map_err(to_status)?;
                if was { vec![touched] } else { Vec::new() }
            }
            Err(_) => return Err(Status::invalid_argument("pgetcd: unknown alarm action")),
        };
        Ok(Response::new(AlarmResponse {
            header: Some(engine.header()),
            alarms,
        }))
    }

    async fn hash_kv(
        &self,
        req: Request<HashKvRequest>,
    ) -> Result<Response<HashKvResponse>, Status> {
        let (hash, current, compact) = self
            .node
            .engine()
            .hash_kv(req.get_ref().revision)
            .await
            .map_err(to_status)?;
        let mut header = self.node.engine().header();
        header.revision = current;
        Ok(Response::new(HashKvResponse {
            header: Some(header),
            hash,
            compact_revision: compact,
            ..Default::default()
        }))
    }

    async fn hash(&self, _req: Request<HashRequest>) -> Result<Response<HashResponse>, Status> {
        let engine = self.node.engine();
        let export = engine.export().await.map_err(to_status)?;
        let (hash, revision) =
            tokio::task::spawn_blocking(move || crate::snapshot::hash::hash(export))
                .await
                .map_err(|e| Status::internal(format!("hash: {e}")))?
                .map_err(|e| Status::internal(format!("hash: {e}")))?;
        let mut header = engine.header();
        header.revision = revision;
        Ok(Response::new(HashResponse {
            header: Some(header),
            hash,
        }))
    }

    async fn defragment(
        &self,
        _req: Request<DefragmentRequest>,
    ) -> Result<Response<DefragmentResponse>, Status> {
        self.node.engine().defragment().await.map_err(to_status)?;
        // etcd 3.5 answers without a header.
        Ok(Response::new(DefragmentResponse { header: None }))
    }

    async fn move_leader(
        &self,
        req: Request<MoveLeaderRequest>,
    ) -> Result<Response<MoveLeaderResponse>, Status> {
        // As etcd 3.5, the answer carries no header.
        self.node.move_leader(req.get_ref().target_id).await?;
        Ok(Response::new(MoveLeaderResponse { header: None }))
    }

    async fn status(
        &self,
        _req: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        let db_size = self.node.engine().db_size().await.map_err(to_status)?;
        let header = self.node.engine().header();
        let revision = u64::try_from(header.revision).unwrap_or(0);
        Ok(Response::new(StatusResponse {
            version: ETCD_VERSION.to_owned(),
            db_size,
            leader: self.node.leader_id(),
            raft_index: revision,
            raft_term: self.node.engine().raft_term(),
            raft_applied_index: revision,
            errors: self
                .node
                .engine()
                .alarms()
                .into_iter()
                .map(|(member_id, alarm)| alarm_text(member_id, alarm))
                .collect(),
            db_size_in_use: db_size,
            is_learner: false,
            header: Some(header),
        }))
    }
}

/// An alarm as etcd's Status lists it (the member's compact text form: `memberID:N
/// alarm:NOSPACE `, the member id left out when 0).
fn alarm_text(member_id: u64, alarm: i32) -> String {
    let name = AlarmType::try_from(alarm)
        .map(|t| t.as_str_name().to_owned())
        .unwrap_or_else(|_| alarm.to_string());
    if member_id == 0 {
        format!("alarm:{name} ")
    } else {
        format!("memberID:{member_id} alarm:{name} ")
    }
}
