//! The Talos side: the machine-config documents a node needs to use this server
//! (`talos patch`), and the mistakes in machine configs that would stop a boot (`talos lint`).

pub mod lint;
pub mod machine_config;
pub mod patch;
pub mod probe;
