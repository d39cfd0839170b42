//! Postgres errors as [`StoreError`]s, classified conservatively by SQLSTATE.
//!
//! A write counts as not having happened (determinate) only when the server reported
//! an error whose SQLSTATE class means the statement, and so its implicit transaction,
//! was rolled back: data exceptions, constraint violations, serialization failures,
//! syntax or privilege errors, a read-only server, resource limits hit while the
//! statement ran, and a cancelled statement. Everything else is indeterminate: a lost
//! connection, operator intervention (`57P01 admin_shutdown` can arrive after the commit
//! record is written, for instance while waiting for a synchronous standby), system and
//! internal errors, and any class not listed.

use pgetcd_storage::StoreError;

/// SQLSTATE classes whose errors prove the statement was rolled back.
const ROLLED_BACK_CLASSES: [&str; 12] = [
    "0A", // feature not supported
    "21", // cardinality violation
    "22", // data exception
    "23", // integrity constraint violation
    "25", // invalid transaction state (read-only transaction on a standby)
    "2B", // dependent privilege descriptors still exist
    "40", // transaction rollback (serialization failure, deadlock)
    "42", // syntax error or access rule violation
    "44", // WITH CHECK OPTION violation
    "53", // insufficient resources (disk full, out of memory, too many connections)
    "54", // program limit exceeded
    "55", // object not in prerequisite state (lock not available)
];

/// `query_canceled`: statement timeout or a cancel request stopped the statement.
const QUERY_CANCELED: &str = "57014";

/// Whether an error with this SQLSTATE proves the statement wrote nothing.
pub fn proves_rollback(sqlstate: &str) -> bool {
    sqlstate == QUERY_CANCELED
        || sqlstate
            .get(..2)
            .is_some_and(|class| ROLLED_BACK_CLASSES.contains(&class))
}

/// A failed write: determinate only when the server's SQLSTATE proves a rollback.
pub fn write_error(context: &'static str) -> impl FnOnce(tokio_postgres::Error) -> StoreError {
    move |e| match e.code() {
        Some(code) if proves_rollback(code.code()) => StoreError::determinate(context, e),
        _ => StoreError::indeterminate(context, e),
    }
}

/// A failed read or connect: nothing was written.
pub fn read_error<E>(context: &'static str) -> impl FnOnce(E) -> StoreError
where
    E: Into<pgetcd_storage::BoxError>,
{
    move |e| StoreError::determinate(context, e)
}

#[cfg(test)]
mod tests {
    use super::proves_rollback;

    #[test]
    fn only_rollback_classes_are_determinate() {
        for (state, rolled_back) in [
            ("23505", true),  // unique violation
            ("22012", true),  // division by zero (the fence)
            ("40001", true),  // serialization failure
            ("40P01", true),  // deadlock
            ("25006", true),  // read-only transaction
            ("42P01", true),  // undefined table
            ("53100", true),  // disk full
            ("55P03", true),  // lock not available
            ("57014", true),  // query canceled
            ("57P01", false), // admin shutdown: may follow the commit record
            ("57P02", false), // crash shutdown
            ("57P03", false), // cannot connect now
            ("08006", false), // connection failure
            ("58030", false), // io error
            ("XX000", false), // internal error
            ("P0001", false), // raise exception: not ours, not proven
            ("", false),
            ("4", false),
        ] {
            assert_eq!(proves_rollback(state), rolled_back, "{state}");
        }
    }
}
