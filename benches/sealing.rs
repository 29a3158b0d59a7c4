//! The sealing scheme alone: what each call costs beyond TLS and the store.

use criterion::{Criterion, criterion_group, criterion_main};
use std::hint::black_box;
use talos_kms_server::sealing::{self, SealedBlob};

const NODE: &str = "213faf71-17a0-43d7-a88b-0afd96094178";
const IP: &str = "10.0.0.201";

fn sealing(c: &mut Criterion) {
    let passphrase = [7u8; 32];
    c.bench_function("seal 32 bytes", |b| {
        b.iter(|| sealing::seal(black_box(NODE), black_box(IP), black_box(&passphrase)))
    });

    let sealed = sealing::seal(NODE, IP, &passphrase).unwrap();
    let blob = SealedBlob::parse(&sealed.blob[..]).unwrap();
    c.bench_function("unseal", |b| {
        b.iter(|| sealing::unseal(black_box(&blob), black_box(&sealed.ciphertext), NODE, IP))
    });
    c.bench_function("unseal failure (wrong address) + decoy", |b| {
        b.iter(|| {
            let refused = sealing::unseal(&blob, &sealed.ciphertext, NODE, black_box("10.0.0.202"));
            (refused, sealing::decoy_passphrase())
        })
    });
    c.bench_function("unseal failure (unknown nonce) + decoy", |b| {
        b.iter(|| {
            sealing::unseal_nothing(black_box(&blob), NODE, IP);
            sealing::decoy_passphrase()
        })
    });
}

criterion_group!(benches, sealing);
criterion_main!(benches);
