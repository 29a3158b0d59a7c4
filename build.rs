//! Generates the gRPC stubs for `sidero.kms.KMSService` without `protoc`: the service is
//! described here in Rust and its two messages are hand-written prost structs in
//! `src/proto.rs`, so a fresh machine needs nothing but cargo to build.

fn main() {
    let method = |name: &str, route: &str| {
        tonic_build::manual::Method::builder()
            .name(name)
            .route_name(route)
            .input_type("crate::proto::Request")
            .output_type("crate::proto::Response")
            .codec_path("crate::proto::SmallMessageCodec")
            .build()
    };
    let service = tonic_build::manual::Service::builder()
        .name("KMSService")
        .package("sidero.kms")
        .method(method("seal", "Seal"))
        .method(method("unseal", "Unseal"))
        .build();
    tonic_build::manual::Builder::new()
        .build_transport(false)
        .compile(&[service]);
}
