//! Tests of the plot module.
