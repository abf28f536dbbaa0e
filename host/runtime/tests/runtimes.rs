//! Runtimes are values: a handle names the runtime it lives on, and the scope a thread entered
//! says where tensors made from nothing go.

use ferrite_plugin_api::{DType, Tensor};
use ferrite_runtime::{self as runtime, Device, Scope};

fn on(d: &Device, values: &[f32]) -> Tensor {
    let _scope = Scope::new(d.clone()).enter();
    Tensor::from_f32(values, &[values.len()]).unwrap()
}

#[test]
fn new_tensors_go_to_the_scope_and_ops_to_where_their_inputs_live() {
    let (a, _) = Device::open("cpu").unwrap();
    let (b, _) = Device::open("cpu").unwrap();
    let (in_a, in_b) = (on(&a, &[1.0, 2.0]), on(&b, &[3.0, 4.0]));
    assert_eq!((a.live(), b.live()), (1, 1));

    // An op on A's tensors runs on A, whatever scope the thread is in.
    let sum = {
        let _scope = Scope::new(b.clone()).enter();
        in_a.add(&in_a).unwrap()
    };
    assert_eq!((a.live(), b.live()), (2, 1));
    assert_eq!(sum.to_vec().unwrap(), [2.0, 4.0]);

    // Two runs' tensors do not mix.
    let e = in_a.add(&in_b).unwrap_err().to_string();
    assert!(e.contains("different runtimes"), "{e}");

    // Scopes nest: the innermost wins; leaving it restores the outer one.
    let _outer = Scope::new(a.clone()).enter();
    {
        let _inner = Scope::new(b.clone()).enter();
        let _z = Tensor::zeros(&[1], DType::F32).unwrap();
        assert_eq!((a.live(), b.live()), (2, 2));
    }
    let _z = Tensor::zeros(&[1], DType::F32).unwrap();
    assert_eq!((a.live(), b.live()), (3, 1));
}

#[test]
fn handles_of_a_closed_runtime_are_dead_and_dropping_them_is_harmless() {
    let (a, _) = Device::open("cpu").unwrap();
    let t = on(&a, &[1.0]);
    drop(a);
    let e = t.to_vec().unwrap_err().to_string();
    assert!(e.contains("not live"), "{e}");
    drop(t);
}

#[test]
fn whoever_asks_by_device_shares_its_runtime() {
    let (x, said) = runtime::for_device("cpu").unwrap();
    let (y, _) = runtime::for_device("cpu").unwrap();
    assert!(x.same(&y), "one runtime per device");
    assert_eq!(said, "computing on cpu");
    let (z, _) = Device::open("cpu").unwrap();
    assert!(!x.same(&z), "a private one when opened");
}
