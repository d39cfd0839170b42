//! Lease requests: grants and revokes through the writer, keepalives and lookups from
//! the lease table.

use pgetcd_proto::etcdserverpb::{
    LeaseGrantRequest, LeaseGrantResponse, LeaseKeepAliveResponse, LeaseLeasesResponse,
    LeaseRevokeRequest, LeaseRevokeResponse, LeaseStatus, LeaseTimeToLiveRequest,
    LeaseTimeToLiveResponse,
};

use crate::Engine;
use crate::error::{Error, Result};
use crate::lease::{MAX_LEASE_TTL, MIN_LEASE_TTL};
use crate::writer::{Op, Reply};

impl Engine {
    /// LeaseGrant: TTL raised to the minimum, an id picked when 0, durable once answered.
    pub async fn lease_grant(&self, r: LeaseGrantRequest) -> Result<LeaseGrantResponse> {
        if r.ttl > MAX_LEASE_TTL {
            return Err(Error::LeaseTtlTooLarge);
        }
        self.check_corrupt()?;
        self.check_space()?;
        let ttl = r.ttl.max(MIN_LEASE_TTL);
        let mut id = r.id;
        while id == 0 || (r.id == 0 && self.core.leases.exists(id)) {
            id = (rand::random::<u64>() >> 1) as i64;
        }
        match self.submit(Op::LeaseGrant { id, ttl }).await? {
            Reply::LeaseGrant(mut resp) => {
                self.fill_header(&mut resp.header);
                Ok(resp)
            }
            _ => Err(Error::Stopped),
        }
    }

    /// LeaseRevoke: deletes the lease's keys in one revision.
    pub async fn lease_revoke(&self, r: LeaseRevokeRequest) -> Result<LeaseRevokeResponse> {
        self.check_corrupt()?;
        match self.submit(Op::LeaseRevoke(r)).await? {
            Reply::LeaseRevoke(mut resp) => {
                self.fill_header(&mut resp.header);
                Ok(resp)
            }
            _ => Err(Error::Stopped),
        }
    }

    /// One keepalive: the lease's TTL, or 0 when it does not exist.
    pub fn lease_keep_alive(&self, id: i64) -> LeaseKeepAliveResponse {
        LeaseKeepAliveResponse {
            header: Some(self.header()),
            id,
            ttl: self.core.leases.keep_alive(id),
        }
    }

    /// LeaseTimeToLive: TTL -1 for an unknown lease, as etcd.
    pub fn lease_time_to_live(&self, r: &LeaseTimeToLiveRequest) -> LeaseTimeToLiveResponse {
        let header = Some(self.header());
        match self.core.leases.info(r.id) {
            Some(info) => LeaseTimeToLiveResponse {
                header,
                id: r.id,
                ttl: info.remaining,
                granted_ttl: info.granted,
                keys: if r.keys { info.keys } else { Vec::new() },
            },
            None => LeaseTimeToLiveResponse {
                header,
                id: r.id,
                ttl: -1,
                granted_ttl: 0,
                keys: Vec::new(),
            },
        }
    }

    /// LeaseLeases: every granted lease.
    pub fn lease_leases(&self) -> LeaseLeasesResponse {
        LeaseLeasesResponse {
            header: Some(self.header()),
            leases: self
                .core
                .leases
                .ids()
                .into_iter()
                .map(|id| LeaseStatus { id })
                .collect(),
        }
    }
}
