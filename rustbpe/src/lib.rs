use pyo3::prelude::*;

#[pymodule]
fn rustbpe(_m: &Bound<'_, PyModule>) -> PyResult<()> {
    Ok(())
}
