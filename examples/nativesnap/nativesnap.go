// Package nativesnap is a reference snapshotter built on
// github.com/snapmeta/storage: a copy-based driver, like containerd's
// "native" snapshotter, that keeps its files under a root directory and all
// of its metadata in a storage.MetaStore, so that one argument to New chooses
// bbolt or etcd.
//
// Every metadata call goes through the package-level drop-in functions
// (storage.CreateSnapshot, storage.GetInfo, ...) on the transaction that
// MetaStore.WithTransaction puts in the context, exactly as containerd's own
// drivers use containerd's store. See docs/porting.md for how a driver is
// ported, with this package as the worked example.
//
// Layout on disk:
//
//	<root>/snapshots/<id>      the directory of snapshot <id>
//	<root>/snapshots/new-*     a directory being prepared (not yet published)
//	<root>/snapshots/rm-<id>   a directory being removed
//
// An active snapshot, and a view without a parent, has a directory of its
// own, a copy of its parent's; a view of a parent mounts the parent's
// directory read-only. Mounts are bind mounts.
//
// # Transactions that run again
//
// On etcd, WithTransaction runs its callback again when the commit lost a
// race, in a new transaction that may hand out a new ID. The filesystem work
// is therefore kept idempotent: Prepare builds the new directory under a
// temporary name before any transaction, publishes it under its ID inside
// the callback (moving it back first when a previous attempt published it
// under another ID), and removes it when the transaction finally fails.
// Commit computes disk usage once per ID; Remove deletes files only after
// the metadata transaction has committed.
//
// # Host scopes: layers shared between containerd daemons
//
// On an etcd store opened in a host scope (storage.WithHost), with the
// same root directory on every host (a shared file system), the
// snapshotter shares committed layers between hosts through containerd's
// remote-snapshot protocol:
//
//   - Commit of an active snapshot whose labels carry
//     containerd.io/snapshot.ref (containerd's unpacker sets it to the
//     layer's chain ID) commits it with storage.CommitShared, indexed by
//     that chain ID.
//   - Prepare (or View) with that label, when a layer with that chain ID is
//     committed in the root on the same parent layer, binds the layer into
//     this host's scope with storage.BindLayer under the name key and
//     returns an AlreadyExists error: containerd then looks the layer up by
//     its label and parent (Walk) and skips the unpack. The binding takes
//     the name key because containerd made it unique in the scope (its
//     "<namespace>/<counter>/<key>"), whereas the chain ID may be bound
//     already in another namespace of the same daemon; containerd takes
//     whatever name its Walk finds.
//   - Remove releases the name with storage.Release, and deletes the
//     directory only when no other binding, in any scope, still uses it.
//
// Without host scopes (bbolt, or an etcd store opened without a host) none
// of this happens: the label is an ordinary label.
package nativesnap

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/continuity/fs"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"

	"github.com/snapmeta/storage"
)

// snapshotter is a copy-based snapshots.Snapshotter.
type snapshotter struct {
	root string
	ms   storage.MetaStore
}

// New returns a snapshotter keeping its files under root (created if
// needed) and its metadata in ms. The snapshotter owns ms from then on:
// Close closes it. When New fails, ms is left open for the caller. When ms
// is host-scoped, root may be shared by the snapshotters of every host of
// ms's root (see the package documentation).
//
//	ms, err := storage.NewBoltMetaStore(filepath.Join(root, "metadata.db"))
//	// or: ms, err := storage.NewEtcdStore("/snapshotters/native", &clientv3.Config{...})
//	sn, err := nativesnap.New(root, ms)
func New(root string, ms storage.MetaStore) (snapshots.Snapshotter, error) {
	if ms == nil {
		return nil, fmt.Errorf("nil metadata store: %w", errdefs.ErrInvalidArgument)
	}
	if root == "" {
		return nil, fmt.Errorf("empty root directory: %w", errdefs.ErrInvalidArgument)
	}
	if err := os.MkdirAll(root, 0o700); err != nil {
		return nil, err
	}
	if err := os.Mkdir(filepath.Join(root, "snapshots"), 0o700); err != nil && !os.IsExist(err) {
		return nil, err
	}
	return &snapshotter{root: root, ms: ms}, nil
}

// Stat returns the info of the snapshot named key.
func (o *snapshotter) Stat(ctx context.Context, key string) (info snapshots.Info, err error) {
	err = o.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		_, info, _, err = storage.GetInfo(ctx, key)
		return err
	})
	if err != nil {
		return snapshots.Info{}, err
	}
	return info, nil
}

// Update changes the labels of a snapshot.
func (o *snapshotter) Update(ctx context.Context, info snapshots.Info, fieldpaths ...string) (_ snapshots.Info, err error) {
	var updated snapshots.Info
	err = o.ms.WithTransaction(ctx, true, func(ctx context.Context) error {
		updated, err = storage.UpdateInfo(ctx, info, fieldpaths...)
		return err
	})
	if err != nil {
		return snapshots.Info{}, err
	}
	return updated, nil
}

// Usage returns the disk usage of a snapshot: measured on disk for an active
// snapshot, as recorded at commit for a committed one.
func (o *snapshotter) Usage(ctx context.Context, key string) (usage snapshots.Usage, err error) {
	var (
		id   string
		info snapshots.Info
	)
	err = o.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		id, info, usage, err = storage.GetInfo(ctx, key)
		return err
	})
	if err != nil {
		return snapshots.Usage{}, err
	}
	if info.Kind == snapshots.KindActive {
		du, err := fs.DiskUsage(ctx, o.dir(id))
		if err != nil {
			return snapshots.Usage{}, err
		}
		usage = snapshots.Usage(du)
	}
	return usage, nil
}

// Mounts returns the mounts of an active or view snapshot.
func (o *snapshotter) Mounts(ctx context.Context, key string) (_ []mount.Mount, err error) {
	var s storage.Snapshot
	err = o.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		s, err = storage.GetSnapshot(ctx, key)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("failed to get snapshot mount: %w", err)
	}
	return o.mounts(s), nil
}

// Prepare creates an active snapshot key, a writable copy of parent.
func (o *snapshotter) Prepare(ctx context.Context, key, parent string, opts ...snapshots.Opt) ([]mount.Mount, error) {
	return o.create(ctx, snapshots.KindActive, key, parent, opts)
}

// View creates a read-only view key of parent.
func (o *snapshotter) View(ctx context.Context, key, parent string, opts ...snapshots.Opt) ([]mount.Mount, error) {
	return o.create(ctx, snapshots.KindView, key, parent, opts)
}

// create adds an active or view snapshot. See the package documentation for
// why the directory is built before the transaction and published inside it.
func (o *snapshotter) create(ctx context.Context, kind snapshots.Kind, key, parent string, opts []snapshots.Opt) (_ []mount.Mount, retErr error) {
	if err := storage.PrepareRemote(ctx, o.ms, key, parent, opts...); err != nil {
		return nil, err
	}
	// A view of a parent mounts the parent's directory; everything else gets
	// a directory of its own.
	ownDir := kind == snapshots.KindActive || parent == ""

	var tmp, cur string // the temporary name; where the new directory is now
	if ownDir {
		var err error
		if tmp, err = o.newDir(); err != nil {
			return nil, err
		}
		cur = tmp
		defer func() {
			if retErr != nil {
				if err := os.RemoveAll(cur); err != nil {
					log.G(ctx).WithError(err).WithField("path", cur).Warn("failed to remove directory of failed snapshot")
				}
			}
		}()
	}

	var (
		s          storage.Snapshot
		filledBy   string // ID of the parent whose files tmp holds
		callbackOK bool   // the callback succeeded: an error is Commit's
	)
	err := o.ms.WithTransaction(ctx, true, func(ctx context.Context) error {
		callbackOK = false
		// Undo the previous attempt's publication: this attempt may get
		// another ID.
		if cur != tmp {
			if err := os.Rename(cur, tmp); err != nil {
				return fmt.Errorf("failed to unpublish %s: %w", cur, err)
			}
			cur = tmp
		}
		var err error
		s, err = storage.CreateSnapshot(ctx, kind, key, parent, opts...)
		if err != nil {
			return fmt.Errorf("failed to create snapshot: %w", err)
		}
		if !ownDir {
			callbackOK = true
			return nil
		}
		if len(s.ParentIDs) > 0 && filledBy != s.ParentIDs[0] {
			// Copy once; again only if the parent's name now stands for
			// another snapshot.
			if filledBy != "" {
				if err := resetDir(tmp); err != nil {
					return err
				}
			}
			if err := copyDir(ctx, tmp, o.dir(s.ParentIDs[0])); err != nil {
				return fmt.Errorf("copying of parent failed: %w", err)
			}
			filledBy = s.ParentIDs[0]
		}
		path := o.dir(s.ID)
		if err := os.Rename(tmp, path); err != nil {
			return fmt.Errorf("failed to rename: %w", err)
		}
		cur = path
		callbackOK = true
		return nil
	})
	if err != nil && callbackOK && o.landed(ctx, key, s.ID) {
		// Commit reported an error, yet the snapshot is there with our ID:
		// the outcome was only unknown to us (a timeout after etcd applied
		// the transaction). The directory belongs to it.
		log.G(ctx).WithError(err).WithField("key", key).Warn("commit reported an error but the snapshot was created")
		err = nil
	}
	if err != nil {
		return nil, err
	}
	return o.mounts(s), nil
}

// landed reports whether the snapshot key exists with the given ID. It is
// asked after a failed Commit, whose context may be done.
func (o *snapshotter) landed(ctx context.Context, key, id string) bool {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
	defer cancel()
	var got string
	err := o.ms.WithTransaction(ctx, false, func(ctx context.Context) (err error) {
		got, _, _, err = storage.GetInfo(ctx, key)
		return err
	})
	return err == nil && got == id
}

// Commit turns the active snapshot key into the committed snapshot name,
// recording its disk usage. On a host-scoped store, a commit labelled
// containerd.io/snapshot.ref is a layer other hosts may bind
// (storage.CommitShared).
func (o *snapshotter) Commit(ctx context.Context, name, key string, opts ...snapshots.Opt) error {
	var (
		usage   snapshots.Usage
		usageOf string // ID usage was measured for
	)
	return o.ms.WithTransaction(ctx, true, func(ctx context.Context) error {
		id, info, _, err := storage.GetInfo(ctx, key)
		if err != nil {
			return err
		}
		// Measure once; a retry measures again only for another snapshot.
		// CommitActive refuses anything but an active snapshot, which is
		// all that has a directory to measure.
		if info.Kind == snapshots.KindActive && usageOf != id {
			du, err := fs.DiskUsage(ctx, o.dir(id))
			if err != nil {
				return err
			}
			usage, usageOf = snapshots.Usage(du), id
		}
		if _, err := storage.CommitRemote(ctx, key, name, usage, opts...); err != nil {
			return fmt.Errorf("failed to commit snapshot: %w", err)
		}
		return nil
	})
}

// Remove removes the snapshot key, which must have no children, and its
// files unless another host's binding of the same layer still uses them
// (storage.Release). The metadata goes first: files are deleted only once
// no snapshot refers to them, so a failure leaves garbage, never a
// snapshot without its directory.
func (o *snapshotter) Remove(ctx context.Context, key string) (err error) {
	var (
		id   string
		last bool
	)
	err = o.ms.WithTransaction(ctx, true, func(ctx context.Context) error {
		id, _, last, err = storage.Release(ctx, key)
		if err != nil {
			return fmt.Errorf("failed to remove: %w", err)
		}
		return nil
	})
	if err != nil {
		return err
	}
	if !last {
		log.G(ctx).WithFields(log.Fields{"key": key, "id": id}).Debug("released a shared layer that other bindings still use")
		return nil
	}
	// A view of a parent has no directory of its own.
	path, renamed := o.dir(id), filepath.Join(o.root, "snapshots", "rm-"+id)
	if err := os.Rename(path, renamed); err != nil {
		if !os.IsNotExist(err) {
			log.G(ctx).WithError(err).WithField("path", path).Warn("failed to rename removed snapshot")
		}
		return nil
	}
	if err := os.RemoveAll(renamed); err != nil {
		// Any rm-* directory is garbage and may be removed by hand.
		log.G(ctx).WithError(err).WithField("path", renamed).Warn("failed to remove root filesystem")
	}
	return nil
}

// Walk calls fn for every snapshot matching filters.
func (o *snapshotter) Walk(ctx context.Context, fn snapshots.WalkFunc, filters ...string) error {
	return o.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		return storage.WalkInfo(ctx, fn, filters...)
	})
}

// Close closes the metadata store. Closing twice is safe.
func (o *snapshotter) Close() error {
	return o.ms.Close()
}

func (o *snapshotter) dir(id string) string {
	return filepath.Join(o.root, "snapshots", id)
}

// newDir makes an empty directory for a new snapshot, under a temporary
// name, with the permissions a container's root expects.
func (o *snapshotter) newDir() (string, error) {
	td, err := os.MkdirTemp(filepath.Join(o.root, "snapshots"), "new-")
	if err != nil {
		return "", fmt.Errorf("failed to create temp dir: %w", err)
	}
	if err := os.Chmod(td, 0o755); err != nil {
		return "", errors.Join(fmt.Errorf("failed to chmod %s to 0755: %w", td, err), os.RemoveAll(td))
	}
	return td, nil
}

// resetDir empties dir, keeping it.
func resetDir(dir string) error {
	if err := os.RemoveAll(dir); err != nil {
		return err
	}
	if err := os.Mkdir(dir, 0o755); err != nil {
		return err
	}
	return os.Chmod(dir, 0o755)
}

// copyDir copies the parent's files into dst, ignoring extended attributes
// that cannot be copied (security.* in most cases, moby/buildkit#1189).
func copyDir(ctx context.Context, dst, src string) error {
	ignoreXattr := func(_, _, xattrKey string, err error) error {
		log.G(ctx).WithError(err).Debugf("failed to copy xattr %q", xattrKey)
		return nil
	}
	return fs.CopyDir(dst, src, fs.WithXAttrErrorHandler(ignoreXattr))
}

// mounts returns the bind mount of s: its own directory, read-write for an
// active snapshot and read-only for a view; the parent's, read-only, for a
// view of a parent.
func (o *snapshotter) mounts(s storage.Snapshot) []mount.Mount {
	source, mode := o.dir(s.ID), "rw"
	if s.Kind == snapshots.KindView {
		mode = "ro"
		if len(s.ParentIDs) > 0 {
			source = o.dir(s.ParentIDs[0])
		}
	}
	return []mount.Mount{{
		Type:    "bind",
		Source:  source,
		Options: []string{"rbind", mode},
	}}
}
