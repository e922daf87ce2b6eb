//! The queue layer: the ticker (`pgqd` mode) and the installer of the SQL in
//! `src/sql/` (PgQ, capture triggers, node state).

pub mod install;
pub mod ticker;
