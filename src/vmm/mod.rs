pub mod guest;
pub mod libluo;
pub mod selftests;
