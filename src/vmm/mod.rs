pub mod guest;
pub mod libluo;
