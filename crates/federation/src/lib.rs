//! Federation: the routing table, upstream registry clients, and the pull-through cache.

pub mod router;
pub mod upstream;

pub use router::{Member, Resolved, RoutingTable};
pub use upstream::Upstream;
