package main

import (
	"context"
	"errors"
	"fmt"
	"sync"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs"

	"github.com/snapmeta/storage"
)

// expiryWatch passes every call to the driver, and notices the first one
// that fails with storage.ErrHostExpired: the host's lease has run out (its
// keep-alives did not reach etcd within --host-ttl), other hosts may have
// taken its snapshots over, and the store refuses every write from then on.
// Only a new store, with a new lease, can go on: the daemon stops (exit
// code 1) so that its supervisor starts a new one.
type expiryWatch struct {
	sn      snapshots.Snapshotter
	once    sync.Once
	expired chan struct{} // closed on the first ErrHostExpired
	cause   error         // that error, once expired is closed
}

func newExpiryWatch(sn snapshots.Snapshotter) *expiryWatch {
	return &expiryWatch{sn: sn, expired: make(chan struct{})}
}

func (w *expiryWatch) check(err error) error {
	if errors.Is(err, storage.ErrHostExpired) {
		w.once.Do(func() {
			w.cause = err
			close(w.expired)
		})
	}
	return err
}

// Stat passes the call to the driver.
func (w *expiryWatch) Stat(ctx context.Context, key string) (snapshots.Info, error) {
	info, err := w.sn.Stat(ctx, key)
	return info, w.check(err)
}

// Update passes the call to the driver.
func (w *expiryWatch) Update(ctx context.Context, info snapshots.Info, fieldpaths ...string) (snapshots.Info, error) {
	info, err := w.sn.Update(ctx, info, fieldpaths...)
	return info, w.check(err)
}

// Usage passes the call to the driver.
func (w *expiryWatch) Usage(ctx context.Context, key string) (snapshots.Usage, error) {
	u, err := w.sn.Usage(ctx, key)
	return u, w.check(err)
}

// Mounts passes the call to the driver.
func (w *expiryWatch) Mounts(ctx context.Context, key string) ([]mount.Mount, error) {
	m, err := w.sn.Mounts(ctx, key)
	return m, w.check(err)
}

// Prepare passes the call to the driver.
func (w *expiryWatch) Prepare(ctx context.Context, key, parent string, opts ...snapshots.Opt) ([]mount.Mount, error) {
	m, err := w.sn.Prepare(ctx, key, parent, opts...)
	return m, w.check(err)
}

// View passes the call to the driver.
func (w *expiryWatch) View(ctx context.Context, key, parent string, opts ...snapshots.Opt) ([]mount.Mount, error) {
	m, err := w.sn.View(ctx, key, parent, opts...)
	return m, w.check(err)
}

// Commit passes the call to the driver.
func (w *expiryWatch) Commit(ctx context.Context, name, key string, opts ...snapshots.Opt) error {
	return w.check(w.sn.Commit(ctx, name, key, opts...))
}

// Remove passes the call to the driver.
func (w *expiryWatch) Remove(ctx context.Context, key string) error {
	return w.check(w.sn.Remove(ctx, key))
}

// Walk passes the call to the driver.
func (w *expiryWatch) Walk(ctx context.Context, fn snapshots.WalkFunc, filters ...string) error {
	return w.check(w.sn.Walk(ctx, fn, filters...))
}

// Cleanup passes the call to the driver if it is a snapshots.Cleaner, and
// is NotImplemented otherwise, as containerd's service says for a driver
// without it.
func (w *expiryWatch) Cleanup(ctx context.Context) error {
	c, ok := w.sn.(snapshots.Cleaner)
	if !ok {
		return fmt.Errorf("snapshotter does not implement Cleanup method: %w", errdefs.ErrNotImplemented)
	}
	return w.check(c.Cleanup(ctx))
}

// Close closes the driver.
func (w *expiryWatch) Close() error {
	return w.sn.Close()
}
