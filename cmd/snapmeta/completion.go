package main

import (
	"github.com/spf13/cobra"
)

// completionCommand writes a shell's completion script. Cobra's own
// completion command is turned off (see rootCommand) because its usage
// errors would not be this tool's one-line exit 2; the scripts are cobra's.
func (a *app) completionCommand() *cobra.Command {
	return &cobra.Command{
		Use:   "completion bash|zsh|fish",
		Short: "Write a shell completion script",
		Long: `Write the completion script of a shell to stdout. The script asks snapmeta
itself what to complete (commands, flags, shells), so it stays right when
the tool changes.

  bash: source <(snapmeta completion bash), or write it to
        /etc/bash_completion.d/snapmeta (needs bash-completion v2)
  zsh:  snapmeta completion zsh > "${fpath[1]}/_snapmeta" (compinit must be on)
  fish: snapmeta completion fish > ~/.config/fish/completions/snapmeta.fish`,
		Example: `  snapmeta completion bash > /etc/bash_completion.d/snapmeta
  source <(snapmeta completion zsh)`,
		ValidArgs: []string{"bash", "zsh", "fish"},
		Args:      exactArgs(1, "one shell: bash, zsh or fish"),
		RunE: func(c *cobra.Command, args []string) error {
			root := c.Root()
			switch args[0] {
			case "bash":
				return root.GenBashCompletionV2(a.stdout, true)
			case "zsh":
				return root.GenZshCompletion(a.stdout)
			case "fish":
				return root.GenFishCompletion(a.stdout, true)
			}
			return usageErrorf("no completion for shell %q: bash, zsh or fish (see '%s --help')", args[0], c.CommandPath())
		},
	}
}
