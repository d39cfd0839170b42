//! The one mapping from engine errors to gRPC statuses, with etcd's exact codes and
//! messages (clients such as kube-apiserver match the messages byte for byte).

use pgetcd_engine::{Error, StoreError};
use tonic::{Code, Status};

/// etcd's code and message for an engine error.
pub fn code_and_message(e: &Error) -> (Code, String) {
    let etcd = |code, msg: &str| (code, msg.to_owned());
    match e {
        Error::EmptyKey => etcd(Code::InvalidArgument, "etcdserver: key is not provided"),
        Error::KeyNotFound => etcd(Code::InvalidArgument, "etcdserver: key not found"),
        Error::ValueProvided => etcd(Code::InvalidArgument, "etcdserver: value is provided"),
        Error::LeaseProvided => etcd(Code::InvalidArgument, "etcdserver: lease is provided"),
        Error::TooManyOps => etcd(
            Code::InvalidArgument,
            "etcdserver: too many operations in txn request",
        ),
        Error::DuplicateKey => etcd(
            Code::InvalidArgument,
            "etcdserver: duplicate key given in txn request",
        ),
        Error::InvalidSortOption => etcd(Code::InvalidArgument, "etcdserver: invalid sort option"),
        Error::Compacted => etcd(
            Code::OutOfRange,
            "etcdserver: mvcc: required revision has been compacted",
        ),
        Error::FutureRevision => etcd(
            Code::OutOfRange,
            "etcdserver: mvcc: required revision is a future revision",
        ),
        Error::LeaseNotFound => etcd(Code::NotFound, "etcdserver: requested lease not found"),
        Error::Corrupt => etcd(Code::DataLoss, "etcdserver: corrupt cluster"),
        Error::NoSpace => etcd(
            Code::ResourceExhausted,
            "etcdserver: mvcc: database space exceeded",
        ),
        Error::LeaseExists => etcd(Code::FailedPrecondition, "etcdserver: lease already exists"),
        Error::LeaseTtlTooLarge => etcd(Code::OutOfRange, "etcdserver: too large lease TTL"),
        Error::RequestTooLarge => etcd(Code::InvalidArgument, "etcdserver: request is too large"),
        Error::Timeout => etcd(Code::Unavailable, "etcdserver: request timed out"),
        Error::Stopped => etcd(Code::Unavailable, "etcdserver: server stopped"),
        Error::LeaderChanged => etcd(Code::Unavailable, "etcdserver: leader changed"),
        Error::Fenced { .. } | Error::NotWriter => {
            etcd(Code::Unavailable, "etcdserver: not leader")
        }
        Error::Storage(s) => match s {
            StoreError::Fenced(_) => etcd(Code::Unavailable, "etcdserver: not leader"),
            StoreError::Misconfigured(_)
            | StoreError::NotEmpty(_)
            | StoreError::SchemaTooNew { .. } => (Code::FailedPrecondition, format!("pgetcd: {e}")),
            StoreError::Determinate { .. } | StoreError::Indeterminate { .. } => (
                Code::Unavailable,
                format!("pgetcd: postgres unavailable: {e}"),
            ),
        },
        Error::MissingValue { .. } => (Code::Internal, format!("pgetcd: {e}")),
    }
}

/// The gRPC status for an engine error.
pub fn to_status(e: Error) -> Status {
    let (code, message) = code_and_message(&e);
    Status::new(code, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etcd_codes_and_messages() {
        let table = [
            (
                Error::EmptyKey,
                Code::InvalidArgument,
                "etcdserver: key is not provided",
            ),
            (
                Error::KeyNotFound,
                Code::InvalidArgument,
                "etcdserver: key not found",
            ),
            (
                Error::ValueProvided,
                Code::InvalidArgument,
                "etcdserver: value is provided",
            ),
            (
                Error::LeaseProvided,
                Code::InvalidArgument,
                "etcdserver: lease is provided",
            ),
            (
                Error::TooManyOps,
                Code::InvalidArgument,
                "etcdserver: too many operations in txn request",
            ),
            (
                Error::DuplicateKey,
                Code::InvalidArgument,
                "etcdserver: duplicate key given in txn request",
            ),
            (
                Error::InvalidSortOption,
                Code::InvalidArgument,
                "etcdserver: invalid sort option",
            ),
            (
                Error::Compacted,
                Code::OutOfRange,
                "etcdserver: mvcc: required revision has been compacted",
            ),
            (
                Error::FutureRevision,
                Code::OutOfRange,
                "etcdserver: mvcc: required revision is a future revision",
            ),
            (
                Error::LeaseNotFound,
                Code::NotFound,
                "etcdserver: requested lease not found",
            ),
            (
                Error::RequestTooLarge,
                Code::InvalidArgument,
                "etcdserver: request is too large",
            ),
            (
                Error::Timeout,
                Code::Unavailable,
                "etcdserver: request timed out",
            ),
            (
                Error::Stopped,
                Code::Unavailable,
                "etcdserver: server stopped",
            ),
            (
                Error::Fenced { schema: "x".into() },
                Code::Unavailable,
                "etcdserver: not leader",
            ),
            (
                Error::NotWriter,
                Code::Unavailable,
                "etcdserver: not leader",
            ),
            (
                Error::LeaderChanged,
                Code::Unavailable,
                "etcdserver: leader changed",
            ),
            (
                Error::Storage(pgetcd_engine::StoreError::Fenced("x".into())),
                Code::Unavailable,
                "etcdserver: not leader",
            ),
        ];
        for (err, code, msg) in table {
            let s = to_status(err);
            assert_eq!(s.code(), code);
            assert_eq!(s.message(), msg);
        }
    }
}
