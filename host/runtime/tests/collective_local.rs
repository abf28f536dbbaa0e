//! burn-collective's local level (several peers of one process, one per device) with two CPU
//! peers, as the data-parallel issue asked: two threads register as peers 0 and 1 of one node,
//! each on its own CPU device value, and average tensors twice in a row. (Ferrite's multi_gpu
//! runs a process per device instead; this records that the local level works on the CPU.)

use burn::backend::Flex;
use burn::tensor::{Tensor, TensorPrimitive};
use burn_collective::{
    CollectiveConfig, PeerId, ReduceOperation, all_reduce, finish_collective, register,
};

#[test]
fn two_cpu_peers_in_one_process_average_tensors() {
    let peers: Vec<_> = (0..2u32)
        .map(|r| {
            std::thread::spawn(move || {
                let device = Default::default();
                register::<Flex>(
                    PeerId(r),
                    device,
                    CollectiveConfig::default().with_num_devices(2),
                )
                .unwrap();
                let mut got = Vec::new();
                for sign in [1.0f32, -1.0] {
                    let mine: Vec<f32> =
                        (1..=4).map(|i| sign * (r + 1) as f32 * i as f32).collect();
                    let t = Tensor::<Flex, 1>::from_floats(mine.as_slice(), &device);
                    let out = all_reduce::<Flex>(
                        PeerId(r),
                        t.into_primitive().tensor(),
                        ReduceOperation::Mean,
                    )
                    .unwrap();
                    let mean = Tensor::<Flex, 1>::from_primitive(TensorPrimitive::Float(out));
                    got.push(mean.into_data().to_vec::<f32>().unwrap());
                }
                finish_collective::<Flex>(PeerId(r)).unwrap();
                got
            })
        })
        .collect();
    for p in peers {
        let got = p.join().unwrap();
        // The mean of (1, 2)·i and of −(1, 2)·i: ±1.5·i.
        for (sign, mean) in [1.0f32, -1.0].iter().zip(got) {
            let want: Vec<f32> = (1..=4).map(|i| sign * 1.5 * i as f32).collect();
            assert_eq!(mean, want);
        }
    }
}
