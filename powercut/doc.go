// Package powercut holds the power-cut tests of the engines (test files
// only): stores live on internal/lossyfs, a FUSE filesystem that undoes
// every write not made durable by fsync, and the tests check that every
// acknowledged commit survives a cut and no half transaction shows. They
// are a package of their own so that the root package's tests stay fast;
// they need root and /dev/fuse, and skip, saying so, without them.
package powercut
