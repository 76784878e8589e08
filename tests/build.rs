//! Generates the gRPC code of the test service (`proto/greeter.proto`) and of `grpc.health.v1` (`proto/health.proto`).
fn main() -> Result<(), Box<dyn std::error::Error>> {
    tonic_prost_build::compile_protos("proto/greeter.proto")?;
    tonic_prost_build::compile_protos("proto/health.proto")?;
    Ok(())
}
