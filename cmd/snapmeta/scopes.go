package main

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/containerd/errdefs"
	"github.com/snapmeta/storage"
	"github.com/snapmeta/storage/internal/storeaddr"
	"github.com/spf13/cobra"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// Host-scoped roots (many containerd hosts on one etcd root, see
// storage.WithHost): a root is opened once (storeaddr.Open), then, when
// storage.ListHosts says it is host-scoped, once more per host through an
// operator's view (storage.WithHostView) on the same client. Whole-root
// commands cover every host, or the one --host names.

// hostFlag adds --host (and so $SNAPMETA_HOST) to a command.
func hostFlag(c *cobra.Command, target *string, what string) {
	c.Flags().StringVar(target, "host", "", what)
}

// hostScope is the store of one host's scope (host "" on a root without
// host scopes, where ms is the root's store).
type hostScope struct {
	host string
	ms   storage.MetaStore
}

// rootView is an open store with its host scopes.
type rootView struct {
	storeHandle
	// cli is the etcd client (nil on bbolt).
	cli *clientv3.Client
	// scoped is set on a host-scoped root; hosts are all its hosts.
	scoped bool
	hosts  []storage.HostInfo
	// scopes are the scopes the command covers: every host's, the one of
	// --host, or the root's own store on a root without host scopes.
	scopes []hostScope
}

// Close closes every view, then the root's store (and its client).
func (v *rootView) Close() error {
	var errs []error
	for _, s := range v.scopes {
		if s.ms != v.MetaStore {
			errs = append(errs, s.ms.Close())
		}
	}
	errs = append(errs, v.MetaStore.Close())
	return errors.Join(errs...)
}

// hostNames returns the names of the root's hosts.
func (v *rootView) hostNames() []string {
	names := make([]string, len(v.hosts))
	for i, h := range v.hosts {
		names[i] = h.Name
	}
	return names
}

// anyScope returns a store through which storage.Check sees the whole root:
// on a host-scoped root any host's view does (one is opened if the
// command covers none).
func (v *rootView) anyScope() (storage.MetaStore, func() error, error) {
	if !v.scoped {
		return v.MetaStore, func() error { return nil }, nil
	}
	if len(v.scopes) > 0 {
		return v.scopes[0].ms, func() error { return nil }, nil
	}
	// A host-scoped root whose hosts were all released: a view of a
	// name no host has sees no snapshots of its own, and Check through it
	// still covers the root.
	ms, err := storage.NewEtcdStoreFromClient(v.cli, v.addr.Root, storage.WithHostView("snapmeta-operator"))
	if err != nil {
		return nil, nil, err
	}
	return ms, ms.Close, nil
}

// hostList is how messages name the hosts of a root.
func hostList(names []string) string {
	if len(names) == 0 {
		return "none"
	}
	return strings.Join(names, ", ")
}

// openRoot opens the store at addr and, on a host-scoped root, a view of
// each host's scope (only host's, when it is set). --host anywhere else,
// or naming no host of the root, is a usage error.
func (a *app) openRoot(ctx context.Context, addr string, mode storeaddr.Mode, host string) (*rootView, error) {
	st, err := a.open(ctx, addr, mode)
	if err != nil {
		return nil, err
	}
	return viewRoot(ctx, st, host)
}

// viewRoot is openRoot on a store already open (which it owns from then
// on: closing the view closes it).
func viewRoot(ctx context.Context, st storeHandle, host string) (*rootView, error) {
	v := &rootView{storeHandle: st, cli: storeaddr.EtcdClient(st.MetaStore)}
	fail := func(err error) (*rootView, error) {
		_ = v.Close()
		return nil, err
	}
	if v.cli == nil {
		if host != "" {
			return fail(usageErrorf("--host %s: %s is a bbolt file; host scopes exist only on etcd roots", host, st.addr))
		}
		v.scopes = []hostScope{{ms: st.MetaStore}}
		return v, nil
	}
	hosts, ok, err := storage.ListHosts(ctx, v.cli, st.addr.Root)
	if err != nil {
		return fail(fmt.Errorf("listing the hosts of %s: %w", st.addr, err))
	}
	if !ok {
		if host != "" {
			return fail(usageErrorf("--host %s: etcd root %q is not host-scoped (it serves one containerd); leave --host out", host, st.addr.Root))
		}
		v.scopes = []hostScope{{ms: st.MetaStore}}
		return v, nil
	}
	v.scoped, v.hosts = true, hosts
	if host != "" && !slices.Contains(v.hostNames(), host) {
		return fail(usageErrorf("--host %s: no such host on etcd root %q (its hosts: %s; see 'snapmeta hosts')", host, st.addr.Root, hostList(v.hostNames())))
	}
	for _, h := range hosts {
		if host != "" && h.Name != host {
			continue
		}
		ms, err := storage.NewEtcdStoreFromClient(v.cli, st.addr.Root, storage.WithHostView(h.Name))
		if err != nil {
			return fail(fmt.Errorf("host %q: %w", h.Name, err))
		}
		v.scopes = append(v.scopes, hostScope{host: h.Name, ms: ms})
	}
	return v, nil
}

// withRoot opens addr as openRoot does, runs fn and closes everything.
func (a *app) withRoot(ctx context.Context, addr string, mode storeaddr.Mode, host string, fn func(*rootView) error) error {
	v, err := a.openRoot(ctx, addr, mode, host)
	if err != nil {
		return err
	}
	err = fn(v)
	if cerr := v.Close(); cerr != nil && err == nil {
		err = cerr
	}
	return err
}

// loadRoot is loadReadableIn over every scope the view covers: the records
// of each host in name order, hosts in name order.
func (a *app) loadRoot(ctx context.Context, v *rootView, prog *progress, filters ...string) (recs []Record, leftOut, err error) {
	var left []error
	for _, s := range v.scopes {
		rs, lo, err := a.loadReadableIn(ctx, s.ms, s.host, prog, filters...)
		if err != nil {
			if s.host != "" {
				err = fmt.Errorf("host %q: %w", s.host, err)
			}
			return nil, nil, err
		}
		for i := range rs {
			// Walk names the scope; a view of it does too.
			rs[i].Host = s.host
		}
		recs = append(recs, rs...)
		if lo != nil {
			left = append(left, lo)
		}
	}
	switch len(left) {
	case 0:
		return recs, nil, nil
	case 1:
		return recs, left[0], nil
	}
	return recs, &exitError{code: 1, err: errors.Join(left...)}, nil
}

// byHost splits records (already grouped by host, as loadRoot returns
// them) into one slice per host, in the order met.
func byHost(recs []Record) (hosts []string, groups map[string][]Record) {
	groups = map[string][]Record{}
	for _, r := range recs {
		if _, ok := groups[r.Host]; !ok {
			hosts = append(hosts, r.Host)
		}
		groups[r.Host] = append(groups[r.Host], r)
	}
	return hosts, groups
}

// parentFirstByHost is parentFirst within each host's scope (names are a
// scope's own: two hosts may have the same), hosts in the order met.
func parentFirstByHost(recs []Record) (ordered []Record, orphans, loops []string) {
	hosts, groups := byHost(recs)
	for _, h := range hosts {
		o, or, lo := parentFirst(groups[h])
		ordered = append(ordered, o...)
		for _, n := range or {
			orphans = append(orphans, qualify(h, n))
		}
		for _, n := range lo {
			loops = append(loops, qualify(h, n))
		}
	}
	return ordered, orphans, loops
}

// qualify names a snapshot with its host, for messages.
func qualify(host, name string) string {
	if host == "" {
		return name
	}
	return host + ":" + name
}

// findScope returns the scope that holds the snapshot name: the one of
// --host, or on a host-scoped root without it the only host that has the
// name. A name several hosts have is a usage error naming them.
func findScope(ctx context.Context, v *rootView, name string) (hostScope, error) {
	if len(v.scopes) == 1 {
		return v.scopes[0], nil
	}
	var found []hostScope
	for _, s := range v.scopes {
		err := s.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
			_, _, _, err := storage.GetInfo(ctx, name)
			return err
		})
		switch {
		case err == nil:
			found = append(found, s)
		case !isNotFound(err):
			return hostScope{}, fmt.Errorf("host %q: %w", s.host, err)
		}
	}
	switch len(found) {
	case 0:
		return hostScope{}, fmt.Errorf("snapshot %q is in no host's scope of etcd root %q (hosts: %s): %w", name, v.addr.Root, hostList(v.hostNames()), errdefs.ErrNotFound)
	case 1:
		return found[0], nil
	}
	var names []string
	for _, s := range found {
		names = append(names, s.host)
	}
	return hostScope{}, usageErrorf("snapshot %q is in the scopes of several hosts (%s): give --host", name, hostList(names))
}

// loadEveryRoot is loadEvery over every scope the view covers, each record
// with its host.
func loadEveryRoot(ctx context.Context, v *rootView, prog *progress) ([]Record, error) {
	var recs []Record
	for _, s := range v.scopes {
		rs, err := loadEvery(ctx, s.ms, prog)
		if err != nil {
			if s.host != "" {
				err = fmt.Errorf("host %q: %w", s.host, err)
			}
			return nil, err
		}
		for i := range rs {
			rs[i].Host = s.host
		}
		recs = append(recs, rs...)
	}
	return recs, nil
}

// scopedTargets opens, for import and migrate, the scope of each of hosts
// on the etcd root st is open on, WithHost: that makes an empty root
// host-scoped, and holds each host's lease until closed, so that the host
// cannot start meanwhile. A root holding snapshots without host scopes, or
// a bbolt file, is refused with a usage error; a host that is running with
// ErrHostAlive.
func scopedTargets(ctx context.Context, st storeHandle, hosts []string) (targets []hostScope, err error) {
	cli := storeaddr.EtcdClient(st.MetaStore)
	if cli == nil {
		return nil, usageErrorf("the snapshots belong to host scopes (they have a host); %s is a bbolt file, which has none: copy them into an etcd root", st.addr)
	}
	_, ok, err := storage.ListHosts(ctx, cli, st.addr.Root)
	if err != nil {
		return nil, err
	}
	if !ok {
		recs, bad, err := loadAll(ctx, st.MetaStore, nil)
		if err != nil {
			return nil, err
		}
		if n := len(recs) + len(bad); n > 0 {
			return nil, usageErrorf("the snapshots belong to host scopes (they have a host); etcd root %q holds %d snapshot(s) without host scopes: copy them into an empty or host-scoped root", st.addr.Root, n)
		}
	}
	defer func() {
		if err != nil {
			for _, t := range targets {
				_ = t.ms.Close()
			}
			targets = nil
		}
	}()
	for _, h := range hosts {
		ms, err := storage.NewEtcdStoreFromClient(cli, st.addr.Root, storage.WithHost(h))
		if errors.Is(err, storage.ErrHostAlive) {
			return targets, fmt.Errorf("host %q of etcd root %q is running (a store of it holds its lease): stop it before copying snapshots into its scope: %w", h, st.addr.Root, err)
		}
		if err != nil {
			return targets, fmt.Errorf("host %q: %w", h, err)
		}
		targets = append(targets, hostScope{host: h, ms: ms})
	}
	return targets, nil
}

// closeScopes closes the stores of targets.
func closeScopes(targets []hostScope) error {
	var errs []error
	for _, t := range targets {
		errs = append(errs, t.ms.Close())
	}
	return errors.Join(errs...)
}

// recordKey is what names a snapshot in a root: its host and its name.
func recordKey(r Record) string { return r.Host + "\x00" + r.Name }
