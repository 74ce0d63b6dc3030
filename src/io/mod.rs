//! Everything that reads or writes: corpora (Parquet through DataFusion), object stores, the
//! Arrow tables btu writes, and atomic output directories.

pub mod corpus;
pub mod output;
pub mod shard;
pub mod store;
pub mod tables;
