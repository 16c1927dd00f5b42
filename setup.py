from setuptools import find_packages, setup


def version() -> str:
    scope: dict = {}
    with open('mmfuse/version.py') as f:
        exec(f.read(), scope)
    return scope['__version__']


setup(
    name='mmfuse',
    version=version(),
    description='Fold normalisation layers and multi-branch blocks into '
    'convolutions, only where the data flow proves it',
    packages=find_packages(exclude=('tests', 'tests.*', 'benchmarks')),
    include_package_data=True,
    python_requires='>=3.8',
    install_requires=['torch>=1.13', 'mmengine>=0.8'],
    extras_require={'tests': ['pytest', 'hypothesis']},
    entry_points={
        'console_scripts':
        ['mmfuse-fuse-conv-bn=mmfuse.cli:console_main'],
    },
    license='Apache License 2.0',
)
