package storage

import (
	"context"
	"errors"
	"fmt"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs"
)

// containerd's remote-snapshot protocol, on host scopes.
//
// containerd's unpacker prepares each layer with the label
// containerd.io/snapshot.ref set to the layer's chain ID. When the
// snapshotter's Prepare answers AlreadyExists, containerd's metadata layer
// skips the unpack: it walks the backend for a committed snapshot with that
// label on the same parent and takes it as the layer. A driver on a
// host-scoped store answers so when another host has committed the layer:
// BindRemote binds it into the driver's scope, labelled as containerd looks
// for it; CommitRemote commits an unpacked layer so that others can bind it.

// RemoteRef returns the content key the containerd.io/snapshot.ref label
// of opts gives (the layer's chain ID), "" when opts set no such label.
func RemoteRef(opts ...snapshots.Opt) (string, error) {
	base, err := applyOpts(opts)
	if err != nil {
		return "", err
	}
	return base.Labels[snapshots.LabelSnapshotRef], nil
}

// BindRemote is the Prepare side of the protocol, in the writable
// transaction ctx carries: when the store is host-scoped and opts carry the
// label containerd.io/snapshot.ref naming a layer committed in the root (by
// CommitRemote or CommitShared) on the layer parent is bound to, it binds
// key to that layer (BindLayer, with opts' labels, the ref label
// included) and reports bound. The driver then commits and answers
// containerd with an error of class AlreadyExists. With nothing to bind
// (no label, no such layer, no parent, a store without host scopes) bound
// is false, nothing is changed, and the driver prepares key as usual.
func BindRemote(ctx context.Context, key, parent string, opts ...snapshots.Opt) (bound bool, err error) {
	if err := readyFrom(ctx, true); err != nil {
		return false, err
	}
	ref, err := RemoteRef(opts...)
	if err != nil || ref == "" {
		return false, err
	}
	_, err = BindLayer(ctx, key, parent, ref, opts...)
	switch {
	case err == nil:
		return true, nil
	case errdefs.IsNotFound(err), errors.Is(err, ErrNotScoped):
		return false, nil
	}
	return false, err
}

// CommitRemote is the Commit side: CommitShared with the content key of
// the containerd.io/snapshot.ref label when the store is host-scoped and
// opts carry it, so that other hosts bind the layer; CommitActive
// otherwise. Its refusals are CommitActive's.
func CommitRemote(ctx context.Context, key, name string, usage snapshots.Usage, opts ...snapshots.Opt) (id string, err error) {
	if err := readyFrom(ctx, true); err != nil {
		return "", err
	}
	ref, err := RemoteRef(opts...)
	if err != nil {
		return "", err
	}
	if ref != "" {
		id, err = CommitShared(ctx, key, name, ref, usage, opts...)
		if !errors.Is(err, ErrNotScoped) {
			return id, err
		}
	}
	return CommitActive(ctx, key, name, usage, opts...)
}

// PrepareRemote runs BindRemote for key in a writable transaction of ms,
// when ms is host-scoped (HostOf), and returns what a driver's Prepare
// answers containerd: an error of class AlreadyExists once key is bound to
// another host's layer, nil when there is nothing to bind and the driver
// prepares key itself, or the error that stopped it.
func PrepareRemote(ctx context.Context, ms MetaStore, key, parent string, opts ...snapshots.Opt) error {
	// The label first: it costs no transaction, and most Prepares have none.
	if ref, err := RemoteRef(opts...); err != nil || ref == "" {
		return err
	}
	if _, scoped := HostOf(ms); !scoped {
		return nil
	}
	var bound bool
	err := ms.WithTransaction(ctx, true, func(ctx context.Context) (err error) {
		bound, err = BindRemote(ctx, key, parent, opts...)
		return err
	})
	if err != nil || !bound {
		return err
	}
	return fmt.Errorf("snapshot %q: bound to a layer another host committed: %w", key, errdefs.ErrAlreadyExists)
}
