//! The replication machinery: the worker of a node (`worker`), reading batches
//! from a provider (`batch`), the initial copy and its merge with the event
//! stream (`copy`), the set-based apply (`apply`), merged tables (`merge`), node state (`node`), the
//! root's rounds (`root`) and the text formats of events and snapshots (`record`).

pub mod apply;
pub mod batch;
pub mod copy;
pub mod execute;
pub mod merge;
pub mod node;
pub mod record;
pub mod root;
pub mod worker;
