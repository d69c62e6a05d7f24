"""An example phd_flow project: fit an OLS on the diabetes data shipped with scikit-learn."""
