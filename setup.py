"""Maps the top-level folders runtime/, sdk/, kernels/ onto the kvrt.* import namespace."""

from setuptools import find_packages, setup

package_dir = {}
for top in ("runtime", "sdk", "kernels"):
    for name in [top, *(f"{top}.{sub}" for sub in find_packages(top))]:
        package_dir[f"kvrt.{name}"] = name.replace(".", "/")

setup(packages=list(package_dir), package_dir=package_dir)
