//! Generates the gRPC code of the test service (`proto/greeter.proto`).
fn main() -> Result<(), Box<dyn std::error::Error>> {
    tonic_prost_build::compile_protos("proto/greeter.proto")?;
    Ok(())
}
