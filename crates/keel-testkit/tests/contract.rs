//! `contract_tests!` runs one suite against every implementation of a port.

use std::collections::VecDeque;
use std::sync::Mutex;

/// A tiny port: a last-in, first-out stack.
trait Stack: Send + Sync {
    fn push(&self, value: i32);
    fn pop(&self) -> Option<i32>;
}

#[derive(Default)]
struct VecStack(Mutex<Vec<i32>>);

impl Stack for VecStack {
    fn push(&self, value: i32) {
        self.0.lock().unwrap().push(value);
    }
    fn pop(&self) -> Option<i32> {
        self.0.lock().unwrap().pop()
    }
}

#[derive(Default)]
struct DequeStack(Mutex<VecDeque<i32>>);

impl Stack for DequeStack {
    fn push(&self, value: i32) {
        self.0.lock().unwrap().push_front(value);
    }
    fn pop(&self) -> Option<i32> {
        self.0.lock().unwrap().pop_front()
    }
}

/// The suite: one async function per rule, taking the subject.
mod stack_contract {
    use super::Stack;

    pub(crate) async fn pops_in_reverse_order(stack: impl Stack) {
        stack.push(1);
        stack.push(2);
        assert_eq!(stack.pop(), Some(2));
        assert_eq!(stack.pop(), Some(1));
    }

    pub(crate) async fn empty_pops_none(stack: impl Stack) {
        assert_eq!(stack.pop(), None);
    }
}

mod vec_stack {
    keel_testkit::contract_tests! {
        factory: || async { (super::VecStack::default(), ()) },
        suite: super::stack_contract,
        tests: [pops_in_reverse_order, empty_pops_none],
    }
}

mod deque_stack {
    keel_testkit::contract_tests! {
        factory: || async { (super::DequeStack::default(), ()) },
        suite: super::stack_contract,
        tests: [pops_in_reverse_order, empty_pops_none,],
    }
}
