-- blocked_users: a user does not receive messages, reactions or typing from users
-- they blocked.
--
-- subscription context:
--   blocked     user ids the subscriber blocked, comma-separated
-- event:
--   the author from the header author_id when the API sets it (cheap), else from
--   the payload's author.id (user_id for reactions and typing), decoded once per event
--   however many subscriptions look at it.

local FROM_A_USER = {
  MESSAGE_CREATE = true, MESSAGE_UPDATE = true,
  MESSAGE_REACTION_ADD = true, TYPING_START = true,
}

return function(event, subscription)
  local blocked = subscription.context.blocked
  if blocked == nil or blocked == "" or not FROM_A_USER[event.headers.type or ""] then
    return true
  end
  local author = event.headers.author_id
  if author == nil then
    local ok, body = pcall(event.json, event)
    if not ok or type(body) ~= "table" then
      return true
    end
    author = (type(body.author) == "table" and body.author.id) or body.user_id
  end
  if author == nil then
    return true
  end
  author = tostring(author)
  for id in string.gmatch(blocked, "[^,]+") do
    if id == author then
      return false
    end
  end
  return true
end
