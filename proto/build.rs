//! Compiles the etcd v3 API .proto files with protox (pure Rust, no system protoc) and
//! generates prost messages, plus tonic servers and clients when the `grpc` feature is on.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["proto/kv.proto", "proto/auth.proto", "proto/rpc.proto"];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let descriptors = protox::compile(files, ["proto"])?;
    if std::env::var_os("CARGO_FEATURE_JSON").is_some() {
        // The JSON mapping of etcd's gateway (grpc-gateway's jsonpb with OrigName): proto
        // field names, 64-bit integers as strings, bytes as base64, enums by name,
        // default values left out; unknown fields ignored.
        let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
        pbjson_build::Builder::new()
            .register_descriptors(&prost::Message::encode_to_vec(&descriptors))?
            .preserve_proto_field_names()
            .ignore_unknown_fields()
            .out_dir(out)
            .build(&[".etcdserverpb", ".mvccpb", ".authpb"])?;
    }
    let grpc = std::env::var_os("CARGO_FEATURE_GRPC").is_some();
    tonic_prost_build::configure()
        .build_server(grpc)
        .build_client(grpc)
        .bytes(".")
        .generate_default_stubs(true)
        .compile_fds(descriptors)?;
    Ok(())
}
