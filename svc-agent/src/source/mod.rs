//! Where the agent's Kubernetes objects come from. Every source produces
//! the same plain lists of objects, which `model::translate` turns into
//! the desired datapath state.

pub mod kube;
pub mod manifests;

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

/// The objects the translation reads.
#[derive(Clone, Debug, Default)]
pub struct Objects {
    pub services: Vec<Service>,
    pub slices: Vec<EndpointSlice>,
}
