//! Compiles the etcd v3 API .proto files with protox (pure Rust, no system protoc) and
//! generates prost messages, plus tonic servers and clients when the `grpc` feature is on.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["proto/kv.proto", "proto/auth.proto", "proto/rpc.proto"];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let descriptors = protox::compile(files, ["proto"])?;
    let grpc = std::env::var_os("CARGO_FEATURE_GRPC").is_some();
    tonic_prost_build::configure()
        .build_server(grpc)
        .build_client(grpc)
        .bytes(".")
        .generate_default_stubs(true)
        .compile_fds(descriptors)?;
    Ok(())
}
