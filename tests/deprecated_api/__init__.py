"""Tests of the deprecated names: each still works, warns, and states the version that removes it. The
package itself never uses them (a package, so that its files may share names with the tests of the modules)."""
