//! Storage errors, classified by what they prove about a write.

use thiserror::Error;

/// Any backend's underlying error.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Result of a storage operation.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// What an error proves about the operation that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Nothing was written.
    Determinate,
    /// It may or may not have been written.
    Indeterminate,
    /// This writer lost the keyspace (or its view of it is stale): nothing was written,
    /// and nothing more will be.
    Fenced,
}

/// An error of a storage operation.
#[derive(Debug, Error)]
pub enum StoreError {
    /// The operation failed and certainly wrote nothing.
    #[error("{context}")]
    Determinate {
        /// What was being done.
        context: &'static str,
        /// The cause.
        #[source]
        source: BoxError,
    },
    /// The operation failed and may have written (connection lost around a commit, a
    /// server error that does not prove a rollback).
    #[error("{context} (outcome unknown)")]
    Indeterminate {
        /// What was being done.
        context: &'static str,
        /// The cause.
        #[source]
        source: BoxError,
    },
    /// The fencing epoch or the previous revision moved: another writer took the
    /// keyspace, or this writer's view is stale. Nothing was written.
    #[error("fenced: {0}")]
    Fenced(String),
    /// The storage server is not configured as pgetcd needs.
    #[error("{0}")]
    Misconfigured(String),
    /// An import was asked to load a keyspace that holds data already.
    #[error("{0}")]
    NotEmpty(String),
    /// The keyspace's schema is newer than this build understands.
    #[error(
        "keyspace {schema:?} has schema version {found}, newer than this pgetcd build supports ({supported}); upgrade pgetcd"
    )]
    SchemaTooNew {
        /// The keyspace.
        schema: String,
        /// Version found.
        found: i32,
        /// Version this build writes.
        supported: i32,
    },
}

impl StoreError {
    /// What the error proves about a write.
    pub fn outcome(&self) -> Outcome {
        match self {
            StoreError::Indeterminate { .. } => Outcome::Indeterminate,
            StoreError::Fenced(_) => Outcome::Fenced,
            StoreError::Determinate { .. }
            | StoreError::Misconfigured(_)
            | StoreError::NotEmpty(_)
            | StoreError::SchemaTooNew { .. } => Outcome::Determinate,
        }
    }

    /// A determinate error from any cause.
    pub fn determinate(context: &'static str, source: impl Into<BoxError>) -> Self {
        StoreError::Determinate {
            context,
            source: source.into(),
        }
    }

    /// An indeterminate error from any cause.
    pub fn indeterminate(context: &'static str, source: impl Into<BoxError>) -> Self {
        StoreError::Indeterminate {
            context,
            source: source.into(),
        }
    }

    /// This error and its causes, joined by `: `.
    pub fn with_causes(&self) -> String {
        let mut s = self.to_string();
        let mut cur = std::error::Error::source(self);
        while let Some(c) = cur {
            s.push_str(": ");
            s.push_str(&c.to_string());
            cur = c.source();
        }
        s
    }
}
